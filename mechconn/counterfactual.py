"""Evaluate a model on the four counterfactual views of a test split.

The views (`mechconn.data.views`): `clean` (no cue), `cue` (own label's cue),
`rand_cue` (a random label's cue: high accuracy = ignores the cue) and
`rand_img` (own label's cue on another image: high accuracy = predicts from the
cue). A cue-reliant model scores high on cue and rand_img, low on clean and
rand_cue; a shape-reliant one the opposite, with rand_img near chance.

- `stack_views`: the views as stacked, masked batches;
- `evaluate_views`: one model on every view, in one compiled program;
- `path_verdict`: Definition 5 on a path evaluated on the views
  (`barriers.evaluate_path_on_sets(apply_fn, points, ts, view_batches, ...)`
  gives {view: PathEval}; each view's `PathEval.summary()` is judged).
"""

import functools

import jax
import numpy as np

from mechconn import barriers
from mechconn import evaluation
from mechconn import finite
from mechconn import input_checks
from mechconn import mesh as mesh_lib
from mechconn import objectives
from mechconn import timing
from mechconn.data import batching
from mechconn.data.views import VIEWS
from mechconn.objectives import Objective
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


@functools.partial(jax.jit, static_argnames=("apply_fn", "objective"))
def _evaluate_views(apply_fn, variables, view_batches, objective):
  return {name: evaluation.mean_metrics(apply_fn, variables, batches, objective)
          for name, batches in view_batches.items()}


@timing.timed(timing.EVALUATION)
def evaluate_views(apply_fn: ApplyFn, variables: dict[str, Params], view_batches: ViewBatches,
                   objective: Objective = objectives.CLASSIFICATION
                   ) -> dict[str, dict[str, jax.Array]]:
  """Loss and accuracy (an objective's metrics) of one model on each view, in one program.

  Args:
    apply_fn: `model.apply` taking `train=`.
    variables: the full variables {'params', 'batch_stats'?}; inference-mode
      BatchNorm.
    view_batches: `stack_views` output (arrays may be sharded over devices), or
      any {name: stacked batches}.
    objective: what is measured (default: classification's loss and accuracy).

  Returns:
    {view: {'loss': scalar, 'accuracy': scalar}} (the objective's metrics),
    exact means over real examples.

  Examples:
    >>> views = evaluate_views(model.apply, state.variables, view_batches)
    >>> views["rand_img"]["accuracy"]

  Raises:
    ValueError: bare params, malformed batches, integer images or images
      outside a normalised range, labels outside the model's classes, a view
      without examples, a negative stored variance (the batch_stats leaf
      named), model outputs the objective cannot read (e.g. a tuple):
      `mechconn.input_checks`.
    finite.NonFiniteError: NaN or infinity in the variables (the first bad
      leaf named), a view's images or a view's loss.
  """
  if not view_batches:
    raise ValueError("view_batches is empty: pass {view: stacked batches} (see stack_views).")
  objectives.check_objective(objective)
  input_checks.check_variables(variables, "evaluate_views")
  for name, batches in view_batches.items():
    input_checks.check_batches(batches, f"view {name!r}", objective)
  variables = mesh_lib.replicate_beside(
      variables, jax.tree.leaves(next(iter(view_batches.values())))[0])
  input_checks.check_inputs(apply_fn, {"the model's params": variables["params"]},
                            view_batches, objective=objective,
                            batch_stats=variables.get("batch_stats"), where="evaluate_views")
  out = _evaluate_views(apply_fn, variables, view_batches, objective)
  input_checks.check_losses({name: r["loss"] for name, r in out.items()}, "View evaluation")
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
    results: {view: PathEval} of one path (`barriers.evaluate_path_on_sets`
      on the views' batches).
    metric: which barrier decides: 'error' (1 - accuracy) or 'loss' for
      classification; any barrier name of the objective (`PathEval.summary`).
    tolerance: a barrier above this breaks the path on that view.

  Returns:
    {'barriers': {view: `PathEval.summary()`}, 'broken_views': views whose barrier
    exceeds the tolerance, 'mechanistically_connected': no view broken, 'metric',
    'tolerance'}.
  """
  if not results:
    raise ValueError("path_verdict needs at least one evaluated view: results is empty.")
  valid = sorted(next(iter(results.values())).barrier_curves())
  if metric not in valid:
    raise ValueError(f"Unknown barrier metric {metric!r}; valid: {valid}.")
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
