"""Evaluate one model on stacked batches, and check what goes into an evaluation.

- `evaluate_variables(apply_fn, variables, batches)`: the exact mean
  cross-entropy and accuracy over the real (mask 1) examples of stacked
  batches, in one scan (inference-mode BatchNorm).
- `check_batches`: keys, shapes and dtypes of stacked batches (static).
- `check_inputs`: one small compiled pass over parameters and data before an
  evaluation (finite parameters and images, labels within the model's classes,
  masks in [0, 1] and not all zero); `check_losses` after it.

Used by path evaluation (`barriers`) and view evaluation (`counterfactual`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mechconn import finite
from mechconn.types import ApplyFn, Params, StackedBatches


def evaluate_variables(apply_fn: ApplyFn, variables: dict[str, Params],
                       eval_batches: StackedBatches) -> tuple[jax.Array, jax.Array]:
  """Exact mean cross-entropy and accuracy over the real (mask 1) examples of stacked batches.

  Scans the [N, B, ...] batches in inference mode (stored BatchNorm statistics).
  """
  def accumulate(totals, batch):
    logits = apply_fn(variables, batch["image"], train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["label"])
    correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    return (totals[0] + jnp.sum(ce * mask), totals[1] + jnp.sum(correct * mask),
            totals[2] + jnp.sum(mask)), None

  zero = jnp.zeros((), jnp.float32)
  (loss_sum, correct_sum, count), _ = jax.lax.scan(accumulate, (zero, zero, zero),
                                                  eval_batches)
  return loss_sum / count, correct_sum / count


def num_classes_of(apply_fn: ApplyFn, params: Params, image_shape: tuple[int, ...],
                   dtype=jnp.float32) -> int:
  """The number of logits of the model for a batch of `image_shape` (abstract, no compute)."""
  def logits(p, x):
    return apply_fn({"params": p}, x, train=True, mutable=["batch_stats"])[0]
  return int(jax.eval_shape(logits, params, jax.ShapeDtypeStruct(image_shape, dtype)).shape[-1])


@functools.partial(jax.jit, static_argnames="num_classes")
def _input_flags(named_trees, eval_sets, bn_batches, *, num_classes):
  """({what: finite?}, {problem: absent?}) over the parameters and data, in one program."""
  finite_flags = {what: finite.all_finite(tree) for what, tree in named_trees.items()}
  valid_flags = {}
  for name, batches in eval_sets.items():
    images, labels, mask = batches["image"], batches["label"], batches["mask"]
    real = mask > 0
    # Padding rows too: their loss is multiplied by a mask of 0, and NaN x 0 is NaN.
    finite_flags[f"the images of eval set {name!r}"] = finite.all_finite(images)
    valid_flags[f"eval set {name!r} has labels outside [0, {num_classes}) (the model's "
                "number of classes)"] = jnp.all(~real | ((labels >= 0) & (labels < num_classes)))
    valid_flags[f"eval set {name!r} has a mask outside [0, 1]"] = jnp.all(
        (mask >= 0) & (mask <= 1))
    valid_flags[f"eval set {name!r} has no real example (its mask is all zero)"] = jnp.any(real)
  if bn_batches is not None:
    finite_flags["the BatchNorm images (bn_batches)"] = finite.all_finite(bn_batches["image"])
  return finite_flags, valid_flags


def check_inputs(apply_fn: ApplyFn, named_params: dict[str, Params],
                 eval_sets: dict[str, StackedBatches],
                 bn_batches: StackedBatches | None = None) -> None:
  """Raises unless all parameters and images are finite and the labels valid.

  One small compiled reduction over the data (no model evaluation), run before
  the evaluation itself, so that a bad input fails in seconds.

  Args:
    apply_fn: the model's apply (its number of classes bounds the labels).
    named_params: {description for messages: a params tree (or batch_stats)};
      the first value is the model's 'params'.
    eval_sets: {name: stacked {'image', 'label', 'mask'}}.
    bn_batches: stacked {'image'} or None.

  Raises:
    ValueError: labels outside the model's classes, a mask outside [0, 1] or
      all zero (an eval set without a real example).
    finite.NonFiniteError: a NaN or infinity in the parameters, in an eval
      set's images (padding rows included: NaN x mask 0 is NaN), or in the
      BatchNorm images.
  """
  image = next(iter(eval_sets.values()))["image"]
  num_classes = num_classes_of(apply_fn, next(iter(named_params.values())), image.shape[1:],
                               image.dtype)
  finite_flags, valid_flags = jax.device_get(
      _input_flags(dict(named_params), dict(eval_sets), bn_batches, num_classes=num_classes))
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


def check_batches(batches, keys, name):
  """Keys, shapes and dtypes of stacked batches (static: no data is read)."""
  missing = [k for k in keys if k not in batches]
  if missing:
    raise ValueError(f"{name} lacks keys {missing}; expected {list(keys)} stacked "
                     "[num_batches, batch_size, ...] (see stack_batches).")
  shape = tuple(batches["image"].shape)
  if len(shape) < 3:
    raise ValueError(f"{name}['image'] must be [num_batches, batch_size, ...], got shape "
                     f"{shape}.")
  if shape[0] == 0 or shape[1] == 0:
    raise ValueError(f"{name} is empty: its images have shape {shape}; expected at least one "
                     "batch of at least one example.")
  for key in ("label", "mask"):
    if key not in keys:
      continue
    leaf = batches[key]
    if tuple(leaf.shape) != shape[:2]:
      raise ValueError(f"{name}[{key!r}] has shape {tuple(leaf.shape)}; expected {shape[:2]} "
                       "(one per image: [num_batches, batch_size]).")
  label_dtype = batches["label"].dtype if "label" in keys else None
  if label_dtype is not None and not jnp.issubdtype(label_dtype, jnp.integer):
    raise ValueError(f"{name}['label'] has dtype {label_dtype}; expected integer class "
                     "indices.")
