"""Evaluate a model on the four counterfactual views of a test split.

The views (`mechconn.data.views`): `clean` (no cue), `cue` (own label's cue),
`rand_cue` (a random label's cue: high accuracy = ignores the cue) and
`rand_img` (own label's cue on another image: high accuracy = predicts from the
cue). A cue-reliant model scores high on cue and rand_img, low on clean and
rand_cue; a shape-reliant one the opposite, with rand_img near chance.

- `stack_views`: the views as stacked, masked batches;
- `evaluate_views`: one model on every view, in one compiled program;
- `path_verdict`: Definition 5 on a path evaluated on the views
  (`barriers.evaluate_path(apply_fn, points, ts, view_batches, ...)` gives
  {view: PathEval}; each view's `PathEval.summary()` is judged).
"""

import functools

import jax
import numpy as np

from mechconn import barriers
from mechconn import evaluation
from mechconn import finite
from mechconn import mesh as mesh_lib
from mechconn.data import batching
from mechconn.data.views import VIEWS
from mechconn.types import ApplyFn, Params, StackedBatches

ViewBatches = dict[str, StackedBatches]


def stack_views(views: dict[str, np.ndarray], labels: np.ndarray, batch_size: int
                ) -> ViewBatches:
  """{view: stacked {'image', 'label', 'mask'} [N, B, ...]} (last batch padded, masked)."""
  unknown = sorted(set(views) - set(VIEWS))
  if unknown:
    raise ValueError(f"Unknown views {unknown}; valid views: {VIEWS}.")
  return {name: batching.stack_batches(images, labels, batch_size)
          for name, images in views.items()}


@functools.partial(jax.jit, static_argnames="apply_fn")
def _evaluate_views(apply_fn, variables, view_batches):
  out = {}
  for name, batches in view_batches.items():
    loss, accuracy = evaluation.evaluate_variables(apply_fn, variables, batches)
    out[name] = {"loss": loss, "accuracy": accuracy}
  return out


def evaluate_views(apply_fn: ApplyFn, variables: dict[str, Params],
                   view_batches: ViewBatches) -> dict[str, dict[str, jax.Array]]:
  """Loss and accuracy of one model on each view, in one compiled program.

  Args:
    apply_fn: `model.apply` taking `train=`.
    variables: {'params', 'batch_stats'?}; inference-mode BatchNorm.
    view_batches: `stack_views` output (arrays may be sharded over devices).

  Returns:
    {view: {'loss': scalar, 'accuracy': scalar}}, exact means over real examples.

  Raises:
    ValueError: labels outside the model's classes or a view without examples.
    finite.NonFiniteError: NaN or infinity in the variables, a view's images
      or a view's loss.
  """
  if not view_batches:
    raise ValueError("view_batches is empty: pass {view: stacked batches} (see stack_views).")
  for name, batches in view_batches.items():
    evaluation.check_batches(batches, ("image", "label", "mask"), f"view {name!r}")
  variables = mesh_lib.replicate_beside(variables, next(iter(view_batches.values()))["image"])
  evaluation.check_inputs(apply_fn, {"the model's params": variables["params"],
                                   "the model's batch_stats": variables.get("batch_stats", {})},
                        view_batches)
  out = _evaluate_views(apply_fn, variables, view_batches)
  evaluation.check_losses({name: r["loss"] for name, r in out.items()}, "View evaluation")
  return out


def format_view_table(results: dict[str, dict[str, float]], title: str = "") -> str:
  """A one-row-per-view plain-text table of loss and accuracy."""
  lines = [title] if title else []
  lines.append(f"{'view':10s} {'loss':>8s} {'accuracy':>9s}")
  for name in VIEWS:
    if name in results:
      lines.append(f"{name:10s} {results[name]['loss']:8.4f} {results[name]['accuracy']:9.4f}")
  return "\n".join(lines)


# Definition 5 of the paper: two models are mechanistically connected by a path
# when the path has no barrier on any counterfactual view. "No barrier" needs a
# tolerance for finite data: by default an accuracy (error) barrier of at most
# 0.05, i.e. nowhere on the path is accuracy more than 5 points below the
# chord between the endpoints' accuracies.
DEFAULT_BARRIER_METRIC = "error"
DEFAULT_BARRIER_TOLERANCE = 0.05


def path_verdict(results: dict[str, barriers.PathEval], *,
                 metric: str = DEFAULT_BARRIER_METRIC,
                 tolerance: float = DEFAULT_BARRIER_TOLERANCE) -> dict:
  """Barriers per view and the paper's Definition 5 verdict.

  Args:
    results: {view: PathEval} of one path (`barriers.evaluate_path` on the
      views' batches).
    metric: 'error' (1 - accuracy) or 'loss': which barrier decides.
    tolerance: a barrier above this breaks the path on that view.

  Returns:
    {'barriers': {view: `PathEval.summary()`},
     'broken_views': views whose barrier exceeds the tolerance,
     'mechanistically_connected': no view broken, 'metric', 'tolerance'}.
  """
  if metric not in ("error", "loss"):
    raise ValueError(f"Unknown barrier metric {metric!r}; valid: ['error', 'loss'].")
  if not results:
    raise ValueError("path_verdict needs at least one evaluated view: results is empty.")
  if not (isinstance(tolerance, (int, float)) and np.isfinite(tolerance) and tolerance >= 0):
    raise ValueError(f"tolerance={tolerance!r} must be a finite number >= 0.")
  table = {view: r.summary() for view, r in results.items()}
  bad = sorted(v for v, b in table.items() if not all(np.isfinite(list(b.values()))))
  if bad:  # NaN > tolerance is False: a NaN barrier would read as "connected"
    raise finite.NonFiniteError(f"path_verdict: the barriers on views {bad} are not finite "
                                f"({ {v: table[v] for v in bad} }); no verdict from them.")
  order = [v for v in VIEWS if v in table] + sorted(set(table) - set(VIEWS))
  broken = [v for v in order if table[v][metric] > tolerance]  # every set judged
  return {"barriers": table, "broken_views": broken,
          "mechanistically_connected": not broken, "metric": metric, "tolerance": tolerance}
