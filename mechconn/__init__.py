"""mechconn: mechanistic mode connectivity in JAX/Flax.

The library is a set of pure functions over parameter pytrees:

- `mechconn.paths`: linear, Bezier and polygonal-chain paths between models.
- `mechconn.batchnorm`: exact recomputation of BatchNorm statistics.
- `mechconn.barriers`: evaluate a path at many t in one compiled program; barriers.
- `mechconn.models`: Flax Linen MLP, SmallCNN, VGG13 and ResNet18.
"""

__version__ = "0.1.0"
