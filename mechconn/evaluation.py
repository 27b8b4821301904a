"""Evaluate one model on stacked batches.

- `mean_metrics(apply_fn, variables, batches, objective)`: the exact weighted
  means of an objective's metrics (cross-entropy and accuracy by default)
  over the real examples of stacked batches, in one scan; pure and jittable,
  and unchecked.
- The checks every evaluation runs first live in `mechconn.input_checks`
  (`check_batches`, `check_inputs`, `check_losses`, re-exported here); the
  checked callers of `mean_metrics` are path evaluation (`barriers`), view
  evaluation (`counterfactual.evaluate_views`) and `evaluate_variables`.
"""

import warnings

import jax
import jax.numpy as jnp

from mechconn import input_checks
from mechconn import objectives as objectives_lib
# The checks every evaluation runs first, re-exported from `mechconn.input_checks`.
from mechconn.input_checks import (  # pylint: disable=unused-import
    check_batches, check_inputs, check_losses, num_classes_of, num_outputs_of)
from mechconn.objectives import Objective
from mechconn.types import ApplyFn, Params, StackedBatches

CLASSIFICATION = objectives_lib.CLASSIFICATION


def mean_metrics(apply_fn: ApplyFn, variables: dict[str, Params], eval_batches: StackedBatches,
                 objective: Objective = CLASSIFICATION) -> dict[str, jax.Array]:
  """Exact weighted means of the objective's metrics over stacked batches.

  Scans the [N, B, ...] batches in inference mode (`train=False`: stored
  BatchNorm statistics): mean_m = sum(w * m) / sum(w) over every element of
  every batch, w the objective's weights (the batch's 'mask'). Pure: call it
  under `jax.jit`, `jax.grad` or `jax.vmap`.

  It checks nothing: NaN inputs or parameters, uint8 images, labels outside
  the classes or a negative stored variance give a number all the same. The
  checked callers are `counterfactual.evaluate_views` (one model, several
  sets), `barriers.evaluate_path` / `evaluate_path_on_sets` (along a path)
  and `evaluate_variables`; or run `mechconn.input_checks` yourself.

  Args:
    apply_fn: the model's apply, `apply_fn(variables, inputs, train=False)`.
    variables: the full variables ({'params', 'batch_stats'?, ...}).
    eval_batches: a batch pytree stacked along a leading axis of N batches.
    objective: what is measured (default: classification's 'loss' and
      'accuracy').

  Returns:
    {metric: scalar float32}.

  Example:
    >>> means = mean_metrics(model.apply, {"params": p, "batch_stats": s}, batches)
    >>> means["loss"], means["accuracy"]
  """
  def sums(batch):
    outputs = apply_fn(variables, objective.inputs_of(batch), train=False)
    return objectives_lib.weighted_sums(objective, outputs, batch)

  first = jax.tree.map(lambda x: x[0], eval_batches)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(sums, first))
  totals, _ = jax.lax.scan(lambda acc, batch: (jax.tree.map(jnp.add, acc, sums(batch)), None),
                           zeros, eval_batches)
  count = totals.pop(objectives_lib.WEIGHT)
  return {name: total / count for name, total in totals.items()}


def evaluate_variables(apply_fn: ApplyFn, variables: dict[str, Params],
                       eval_batches: StackedBatches) -> tuple[jax.Array, jax.Array]:
  """Deprecated: (loss, accuracy) of a classifier on stacked batches; checked.

  Runs the checks of `counterfactual.evaluate_views` (which it equals on one
  set) before `mean_metrics` and refuses a non-finite loss.

  Raises:
    ValueError: bare params, malformed batches, integer or unnormalised
      images, labels outside the classes, no real example, a negative
      stored variance, outputs that are not logits (`input_checks`).
    finite.NonFiniteError: NaN or infinity in the variables, the images or
      the loss.
  """
  warnings.warn("evaluation.evaluate_variables is deprecated and will be removed in the next "
                "release: use counterfactual.evaluate_views(apply_fn, variables, {'eval': "
                "batches}) (checked), or evaluation.mean_metrics(apply_fn, variables, batches) "
                "(pure, unchecked), which return {'loss': ..., 'accuracy': ...}.",
                DeprecationWarning, stacklevel=2)
  input_checks.check_variables(variables, "evaluate_variables")
  input_checks.check_batches(eval_batches, "eval set 'eval'")
  input_checks.check_inputs(apply_fn, {"the model's params": variables["params"]},
                            {"eval": eval_batches}, batch_stats=variables.get("batch_stats"),
                            where="evaluate_variables")
  means = mean_metrics(apply_fn, variables, eval_batches)
  input_checks.check_losses({"eval": means["loss"]}, "Evaluation")
  return means["loss"], means["accuracy"]
