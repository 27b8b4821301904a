"""Where and why a barrier forms: diagnostics along a path, on the open core.

Each is a pure function of arrays run over every t in one compiled program,
for any model and objective the path core takes (Linen, NNX through
`mechconn.adapters`), with BatchNorm recomputed at every t:

- `groups`: parameter groups (top-level submodules, prefixes, a permutation spec).
- `layerwise`: barriers when only one group (or all but one) moves.
- `features`: feature connectivity (LLFC cosine) and activation-pattern agreement.
- `curvature`: top Hessian eigenvalues (Lanczos) and trace (Hutchinson) along a path.
- `calibration`: the loss barrier after one fitted softmax temperature per t.
- `adaptive`: the maximum of a barrier curve to a stated tolerance, with few evaluations.
"""
