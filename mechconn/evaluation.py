"""Evaluate one model on stacked batches, and check what goes into an evaluation.

- `mean_metrics(apply_fn, variables, batches, objective)`: the exact weighted
  means of an objective's metrics (cross-entropy and accuracy by default)
  over the real examples of stacked batches, in one scan; pure and jittable.
- `check_batches`: keys, shapes and dtypes of stacked batches (static).
- `check_inputs`: one small compiled pass over parameters and data before an
  evaluation (finite parameters and inputs, targets within the model's
  outputs, weights valid and not all zero); `check_losses` after it.

Used by path evaluation (`barriers`) and view evaluation (`counterfactual`).
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from mechconn import finite
from mechconn import objectives as objectives_lib
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
  """Deprecated: `mean_metrics(...)` returns {'loss', 'accuracy'} (any objective)."""
  warnings.warn("evaluation.evaluate_variables is deprecated and will be removed in the next "
                "release: use evaluation.mean_metrics(apply_fn, variables, batches), which "
                "returns {'loss': ..., 'accuracy': ...}.", DeprecationWarning, stacklevel=2)
  means = mean_metrics(apply_fn, variables, eval_batches)
  return means["loss"], means["accuracy"]


def num_outputs_of(apply_fn: ApplyFn, params: Params, inputs) -> int:
  """The size of the last axis of the model's (first) output for `inputs` (abstract, no compute)."""
  def outputs(p, x):
    return apply_fn({"params": p}, x, train=True, mutable=["batch_stats"])[0]
  out = jax.eval_shape(outputs, params, inputs)
  return int(jax.tree.leaves(out)[0].shape[-1])


def num_classes_of(apply_fn: ApplyFn, params: Params, image_shape: tuple[int, ...],
                   dtype=jnp.float32) -> int:
  """The number of logits of the model for a batch of `image_shape` (abstract, no compute)."""
  return num_outputs_of(apply_fn, params, jax.ShapeDtypeStruct(image_shape, dtype))


@functools.partial(jax.jit, static_argnames=("num_outputs", "objective"))
def _input_flags(named_trees, eval_sets, bn_batches, *, num_outputs, objective):
  """({what: finite?}, {problem: absent?}) over the parameters and data, in one program."""
  finite_flags = {what: finite.all_finite(tree) for what, tree in named_trees.items()}
  valid_flags = {}
  mask_weights = objective.weights == "mask"
  for name, batches in eval_sets.items():
    weights = jax.vmap(objective.weights_of)(batches)
    real = weights > 0
    # Padding rows too: their loss is multiplied by a weight of 0, and NaN x 0 is NaN.
    for key, leaf in batches.items():
      what = "images" if key == "image" else f"{key!r} entries"
      finite_flags[f"the {what} of eval set {name!r}"] = finite.all_finite(leaf)
    if objective.check_targets is not None:
      valid = jax.vmap(objective.check_targets, in_axes=(0, None))(batches, num_outputs)
      what = ("labels", "classes") if objective is CLASSIFICATION else ("targets", "outputs")
      valid_flags[f"eval set {name!r} has {what[0]} outside [0, {num_outputs}) (the model's "
                  f"number of {what[1]})"] = jnp.all(~real | valid)
    if mask_weights:
      valid_flags[f"eval set {name!r} has a mask outside [0, 1]"] = jnp.all(
          (weights >= 0) & (weights <= 1))
    else:
      valid_flags[f"eval set {name!r} has negative weights"] = jnp.all(weights >= 0)
    weights_are = "its mask is" if mask_weights else "its weights are"
    valid_flags[f"eval set {name!r} has no real example ({weights_are} all zero)"] = (
        jnp.any(real))
  if bn_batches is not None:
    for key, leaf in bn_batches.items():
      what = "images" if key == "image" else f"{key!r} entries"
      finite_flags[f"the BatchNorm {what} (bn_batches)"] = finite.all_finite(leaf)
  return finite_flags, valid_flags


def check_inputs(apply_fn: ApplyFn, named_params: dict[str, Params],
                 eval_sets: dict[str, StackedBatches],
                 bn_batches: StackedBatches | None = None,
                 objective: Objective = CLASSIFICATION) -> None:
  """Raises unless all parameters and inputs are finite and the targets valid.

  One small compiled reduction over the data (no model evaluation), run before
  the evaluation itself, so that a bad input fails in seconds.

  Args:
    apply_fn: the model's apply (its number of outputs bounds the targets).
    named_params: {description for messages: a params tree (or batch_stats)};
      the first value is the model's 'params'.
    eval_sets: {name: stacked batches}.
    bn_batches: stacked batches for BatchNorm statistics, or None.
    objective: the objective the sets are evaluated with.

  Raises:
    ValueError: targets outside the model's outputs (labels outside its
      classes), a mask outside [0, 1] (negative weights), or all weights zero
      (an eval set without a real example).
    finite.NonFiniteError: a NaN or infinity in the parameters, in an eval
      set's inputs (padding rows included: NaN x mask 0 is NaN), or in the
      BatchNorm inputs.
  """
  first = jax.tree.map(lambda x: x[0], next(iter(eval_sets.values())))
  inputs = jax.eval_shape(objective.inputs_of, first)
  num_outputs = num_outputs_of(apply_fn, next(iter(named_params.values())), inputs)
  finite_flags, valid_flags = jax.device_get(
      _input_flags(dict(named_params), dict(eval_sets), bn_batches, num_outputs=num_outputs,
                   objective=objective))
  invalid = [problem for problem, ok in valid_flags.items() if not ok]
  if invalid:
    raise ValueError("Evaluation refused: " + "; ".join(invalid) + ".")
  finite.raise_if_any(finite_flags, "Evaluation refused")


def check_losses(losses: dict[str, jax.Array], context: str, ts: np.ndarray | None = None
                 ) -> None:
  """Raises NonFiniteError naming each set (and t) whose loss is not finite."""
  flags = {}
  for name, loss in jax.device_get(losses).items():
    bad = ~np.isfinite(np.atleast_1d(np.asarray(loss)))
    if bad.any():
      where = "" if ts is None else " at t = " + ", ".join(f"{t:.3g}" for t in ts[bad])
      flags[f"the loss on {name!r}{where}"] = False
  finite.raise_if_any(flags, context)


def check_batches(batches, name: str, objective: Objective = CLASSIFICATION,
                  weighted: bool = True) -> None:
  """Keys, shapes and dtypes of stacked batches (static: no data is read).

  Every leaf must be stacked [num_batches, batch_size, ...] with the same two
  leading sizes; the keys the objective reads must be present (only its
  inputs when not `weighted`: batches for statistics); a 'label' must be
  integer class indices, one per example.
  """
  if not isinstance(batches, dict) or not batches:
    raise ValueError(f"{name} must be a non-empty dict of stacked arrays "
                     "[num_batches, batch_size, ...] (see stack_batches); got "
                     f"{type(batches).__name__}{' (empty)' if isinstance(batches, dict) else ''}.")
  wanted = objective.required_keys() if weighted else objective.required_keys(inputs_only=True)
  missing = [k for k in wanted if k not in batches]
  if missing:
    raise ValueError(f"{name} lacks keys {missing}; expected {list(wanted)} stacked "
                     "[num_batches, batch_size, ...] (see stack_batches).")
  leaves = jax.tree_util.tree_flatten_with_path(batches)[0]
  for path, leaf in leaves:
    shape = tuple(np.shape(leaf))
    where = f"{name}[{finite.leaf_path(path)!r}]"
    if len(shape) < 2:
      raise ValueError(f"{where} must be [num_batches, batch_size, ...], got shape {shape}.")
    if shape[0] == 0 or shape[1] == 0:
      what = "its images have" if where.endswith("['image']") else f"{where} has"
      raise ValueError(f"{name} is empty: {what} shape {shape}; expected at least one "
                       "batch of at least one example.")
  lead_key, lead_shape = finite.leaf_path(leaves[0][0]), tuple(np.shape(leaves[0][1]))[:2]
  if "image" in batches:
    shape = tuple(np.shape(batches["image"]))
    if len(shape) < 3:
      raise ValueError(f"{name}['image'] must be [num_batches, batch_size, ...], got shape "
                       f"{shape}.")
    lead_key, lead_shape = "image", shape[:2]
  for path, leaf in leaves:
    shape, key = tuple(np.shape(leaf)), finite.leaf_path(path)
    if shape[:2] != lead_shape:
      expected = (f"{lead_shape} (one per image: [num_batches, batch_size])"
                  if key in ("label", "mask") and len(shape) == 2
                  else f"leading axes {lead_shape}, as {name}[{lead_key!r}]")
      raise ValueError(f"{name}[{key!r}] has shape {shape}; expected {expected}.")
  if "label" in batches and not jnp.issubdtype(batches["label"].dtype, jnp.integer):
    raise ValueError(f"{name}['label'] has dtype {batches['label'].dtype}; expected integer "
                     "class indices.")
