"""Fitting a low-loss curve between two fixed networks (Garipov et al. 2018).

The curve is a Bezier curve (quadratic by default) or a polygonal chain whose
end points are the two trained networks, held fixed; its free control points
are trained so that the expected loss over t ~ U(0, 1) is low. Each step draws
one t from the step's key, forms the parameters at path(t) and takes the
gradient of the loss there with respect to the free points only: autodiff
supplies the path's derivative (for a quadratic Bezier, d theta(t) / d theta_M
= 2 t (1 - t)). BatchNorm runs in training mode at path(t) (batch statistics),
as in the paper's code; statistics for evaluation are recomputed per t later.

`CurveLoss` is a `types.LossFn`, so curves train with `step.train_step` and
`loop.train_loop` (checkpointed, resumable). The free points are the state's
`params`: a tuple of parameter trees.
"""

from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp

from mechconn import objectives
from mechconn import paths
from mechconn import step as step_lib
from mechconn.types import ApplyFn, Params

CURVE_KINDS = ("bezier", "polychain")
INITS = ("fresh", "linear")


@flax.struct.dataclass
class CurveLoss:
  """Cross-entropy at path(t), t ~ U(0, 1) from the step key; differentiated in the free points.

  Attributes:
    apply_fn: the model's apply.
    kind: 'bezier' or 'polychain'.
    start, end: the fixed end points' params (t = 0 and t = 1).
    batch_stats: any batch_stats of the model (only their structure is used:
      BatchNorm runs on batch statistics); {} for models without BatchNorm.
  """

  apply_fn: ApplyFn = flax.struct.field(pytree_node=False)
  kind: str = flax.struct.field(pytree_node=False)
  start: Params
  end: Params
  batch_stats: Params

  def __call__(self, free, batch_stats, batch, rng):
    t = jax.random.uniform(rng, (), jnp.float32)
    params = paths.path_fn(self.kind)((self.start, *free, self.end), t)
    logits, _ = step_lib.apply_train_mode(self.apply_fn, params, self.batch_stats, batch["image"])
    means = objectives.mean_classification_metrics(logits, batch["label"])  # float32
    return means["loss"], (batch_stats, {"accuracy": means["accuracy"], "t": t})


def init_free_points(start: Params, end: Params, num_free: int, init: str,
                     fresh: Sequence[Params] | None = None) -> tuple[Params, ...]:
  """Initial free control points.

  Args:
    start, end: the fixed end points.
    num_free: number of free points (degree - 1 for a Bezier curve, the
      number of bends for a polygonal chain).
    init: 'fresh' (freshly initialised networks, as the paper's code) or
      'linear' (evenly spaced on the segment from start to end: the midpoint
      for a quadratic curve).
    fresh: `num_free` fresh parameter trees, for init='fresh'.
  """
  if num_free < 1:
    raise ValueError(f"A curve needs at least one free point, got {num_free}.")
  if init == "fresh":
    if fresh is None or len(fresh) != num_free:
      raise ValueError(f"init='fresh' needs {num_free} fresh parameter trees.")
    points = tuple(fresh)
  elif init == "linear":
    points = tuple(paths.linear(start, end, (k + 1) / (num_free + 1)) for k in range(num_free))
  else:
    raise ValueError(f"Unknown curve init {init!r}; valid: {list(INITS)}.")
  paths.check_matching((start, *points, end))
  return points


def curve_points(start: Params, free: Sequence[Params], end: Params) -> tuple[Params, ...]:
  """All control points of a fitted curve, in path order."""
  return (start, *free, end)
