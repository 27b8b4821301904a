"""mechconn: mechanistic mode connectivity in JAX/Flax.

Pure functions over parameter pytrees, and the tasks built from them:

- `mechconn.types`: shared aliases and protocols (Params, Batch, StackedBatches, ApplyFn, ...).
- `mechconn.trees`: small pytree helpers (`variables_of`, `stack`).
- `mechconn.paths`: linear, Bezier and polygonal-chain paths between models.
- `mechconn.batchnorm`: exact recomputation of BatchNorm statistics.
- `mechconn.evaluation`: exact masked means over stacked batches; input checks.
- `mechconn.barriers`: evaluate a path at many t in one compiled program; barriers.
- `mechconn.align`: permutation specs, weight and activation matching.
- `mechconn.diagnostics`: where and why a barrier forms (layer-wise barriers, feature
  connectivity, curvature, calibrated barriers, an adaptive maximum).
- `mechconn.counterfactual`: the four views; the Definition 5 verdict.
- `mechconn.curves`: fitting a curve between two fixed networks.
- `mechconn.finetune`: fine-tuning methods as data, and their losses (CBFT).
- `mechconn.step`: TrainState, the pure train_step, optimisers.
- `mechconn.loop`: the resumable training loop and `fit`.
- `mechconn.flops`: FLOPs of a model from its layer shapes.
- `mechconn.finite`, `checkpoint`, `workdir`, `mesh`, `dry_run`, `report`, `rngs`:
  infrastructure that knows no task.
- `mechconn.data`, `mechconn.models`: datasets, cues and views; Flax Linen models.
- `mechconn.tasks`: train, fit_curve, eval_path, finetune, reproduce, quickstart.
"""

__version__ = "0.1.0"
