"""Inputs checked where they enter the library: refuse what would give a wrong number.

The eager entry points (`barriers.evaluate_path`, `evaluate_path_on_sets`,
`counterfactual.evaluate_views`, `evaluation.evaluate_variables`) run these
before (and, for the losses, after) the evaluation; the pure cores
(`path_core.path_metrics`, `evaluation.mean_metrics`) stay jittable and run
only the static ones (or none).

Static (no data read, no compute):
  - `check_batches`: keys, shapes and dtypes of stacked batches; images (the
    'image' key an objective reads) must be floating point;
  - `check_variables`: full variables {'params', 'batch_stats'?} where they go;
  - `check_outputs`: the model's outputs fit the objective (`jax.eval_shape`);
  - `check_point_dtypes`: the points of a path share their dtypes.
One small compiled pass over the data (`check_inputs`): finite parameters and
inputs, images within a normalised range, stored variances >= 0, targets
within the model's outputs, weights valid and not all zero. After the
evaluation: `check_losses`. In-graph, for the path core's flags:
`statistics_vary`.
"""

import functools
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mechconn import adapters
from mechconn import finite
from mechconn import objectives as objectives_lib
from mechconn.objectives import Objective
from mechconn.types import ApplyFn, Params, StackedBatches

CLASSIFICATION = objectives_lib.CLASSIFICATION
IMAGE_KEY = "image"  # the batch key of images: floating point, normalised
# Normalised CIFAR, ImageNet and MNIST pixels, (x / 255 - mean) / std, lie within about
# [-2.2, 2.9] (MNIST's brightest: (1 - 0.1307) / 0.3081 = 2.8), [0, 1]-scaled and [-1, 1]
# images within 1. 32 leaves an order of magnitude for other normalisations (per-image
# standardisation, whitening) and refuses the 0..255 scale, which passes 32 in any set with
# a pixel brighter than 32 / 255.
MAX_ABS_IMAGE = 32.0
# A unit is constant over the statistics data when its variance is at most this times its
# squared mean: float32 rounding of a constant's mean leaves a variance near (1e-7 mean)^2.
CONSTANT_RELATIVE_VARIANCE = 1e-10
OTHER_KEY_HINT = ("if this scale is intended (the model normalises its inputs itself), pass "
                  "them under another key named in the objective, e.g. batches {'pixels', "
                  "'label', 'mask'} with objective=dataclasses.replace("
                  "objectives.CLASSIFICATION, inputs='pixels')")
_EXPECTED_OUTPUTS = {"classification": "one array of logits [batch, classes]",
                     "next_token": "one array of logits [batch, length - 1, vocabulary]",
                     "regression": "one array [batch, ...] with the target's entries"}


def reads_images(objective: Objective) -> bool:
  """Whether the objective's model input is the batch's 'image' key (checked as images)."""
  return objective.inputs == IMAGE_KEY


def check_batches(batches, name: str, objective: Objective = CLASSIFICATION,
                  weighted: bool = True) -> None:
  """Keys, shapes and dtypes of stacked batches (static: no data is read).

  Every leaf must be stacked [num_batches, batch_size, ...] with the same two
  leading sizes; the keys the objective reads must be present (only its
  inputs when not `weighted`: batches for statistics); a 'label' must be
  integer class indices, one per example; images (the 'image' key, when the
  objective reads its input from it) must be floating point (normalised).
  Other input keys (a language model's integer 'tokens') are not images.

  Raises:
    ValueError: naming the key and its shape or dtype, and what was expected.
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
  if IMAGE_KEY in batches:
    shape = tuple(np.shape(batches[IMAGE_KEY]))
    if len(shape) < 3:
      raise ValueError(f"{name}['image'] must be [num_batches, batch_size, ...], got shape "
                       f"{shape}.")
    lead_key, lead_shape = IMAGE_KEY, shape[:2]
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
  if reads_images(objective) and not jnp.issubdtype(batches[IMAGE_KEY].dtype, jnp.floating):
    raise ValueError(f"{name}['image'] has dtype {batches[IMAGE_KEY].dtype}; expected "
                     "floating-point images, normalised: convert uint8 images with "
                     "x / 255 and normalise by the dataset's mean and std (e.g. "
                     f"mechconn.data.datasets.normalize); {OTHER_KEY_HINT}.")


def check_variables(variables, where: str) -> None:
  """Raises ValueError unless `variables` are a model's full variables {'params', ...}."""
  if not isinstance(variables, dict) or "params" not in variables:
    got = sorted(variables)[:5] if isinstance(variables, dict) else type(variables).__name__
    raise ValueError(f"{where} takes the model's full variables {{'params', "
                     "'batch_stats'?}} (inference reads the stored statistics); got "
                     f"{got} (bare params?).")


def _describe(tree) -> str:
  """'float32[16, 4]', '(float32[16, 4], float32[16, 32])', "{'logits': ...}" of outputs."""
  if hasattr(tree, "shape") and hasattr(tree, "dtype"):
    return f"{tree.dtype}{list(tree.shape)}"
  if isinstance(tree, (tuple, list)):
    inner = ", ".join(_describe(x) for x in tree)
    return f"({inner})" if isinstance(tree, tuple) else f"[{inner}]"
  if isinstance(tree, dict):
    return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in tree.items()) + "}"
  return type(tree).__name__


def check_outputs(apply_fn: ApplyFn, params: Params, batches: StackedBatches,
                  objective: Objective = CLASSIFICATION, where: str = "Evaluation") -> int:
  """The model's outputs fit the objective; the size of the (first) output's last axis.

  Abstract (`jax.eval_shape` of the model and of the objective's metrics on
  one batch): no compute.

  Raises:
    TypeError: the model takes no `train` argument (with the adapter to use).
    ValueError: the objective's metrics cannot be computed from the model's
      outputs (e.g. a model returning (logits, features)), naming what it
      returned and how to adapt it.
  """
  batch = jax.eval_shape(lambda b: jax.tree.map(lambda x: x[0], b), batches)
  inputs = jax.eval_shape(objective.inputs_of, batch)
  try:
    out = jax.eval_shape(
        lambda p, x: apply_fn({"params": p}, x, train=True, mutable=["batch_stats"])[0],
        params, inputs)
  except TypeError as e:
    hint = adapters.train_argument_hint(e)
    if hint is None:
      raise
    raise TypeError(f"{where}: {hint}.") from e
  try:
    jax.eval_shape(functools.partial(objectives_lib.weighted_sums, objective), out, batch)
  except Exception as e:  # whatever the metrics raise on these outputs, named with them
    expected = _EXPECTED_OUTPUTS.get(objective.name, "outputs its metrics can read")
    raise ValueError(
        f"{where}: the model returns {_describe(out)} for inputs {_describe(inputs)}, but "
        f"objective {objective.name!r} expects {expected} ({type(e).__name__}: {e}). Pass an "
        "apply_fn that returns just that; for a model returning (logits, features): "
        "def apply_fn(variables, x, **kw): out = model.apply(variables, x, **kw); return "
        "(out[0][0], out[1]) if kw.get('mutable') else out[0]  (with `mutable`, Flax "
        "returns (outputs, state)).") from e
  leaves = jax.tree.leaves(out)
  return int(leaves[0].shape[-1]) if leaves and leaves[0].shape else 0


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


def check_point_dtypes(points, where: str) -> None:
  """Raises ValueError when the points of a path hold different dtypes (static).

  A path's leaves are formed in point 0's dtype (`paths`), so a bfloat16 end
  point beside a float32 one would be evaluated as float32 unannounced.
  Points of different structures are left to `paths.check_matching`.
  """
  reference = jax.tree_util.tree_flatten_with_path(points[0])
  for i, point in enumerate(points[1:], start=1):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(point)
    if treedef != reference[1]:
      continue
    for (path, a), (_, b) in zip(reference[0], leaves):
      if jnp.result_type(a) != jnp.result_type(b):
        raise ValueError(
            f"{where}: path point {i} holds {jnp.result_type(b)} where point 0 holds "
            f"{jnp.result_type(a)} (first at leaf {finite.leaf_path(path)!r}); a path "
            "between them would be computed in point 0's dtype. Cast the points to one "
            "dtype first, e.g. points = [jax.tree.map(lambda x: x.astype(jnp.float32), p) "
            "for p in points].")


class IdenticalEndpointsWarning(UserWarning):
  """A path whose two end points are the same weights: flat by construction."""


@jax.jit
def _trees_equal(a, b) -> jax.Array:
  return jnp.all(jnp.stack([jnp.array_equal(x, y) for x, y in
                            zip(jax.tree.leaves(a), jax.tree.leaves(b))] or [True]))


def warn_if_identical_ends(points, where: str) -> None:
  """Warns (`IdenticalEndpointsWarning`) when a path's first and last points are the same
  weights: its barrier is 0 by construction, which reads as "connected" (one compiled
  comparison). Silence it with `warnings.simplefilter('ignore', IdenticalEndpointsWarning)`
  where a flat control path is meant."""
  a, b = points[0], points[-1]
  if jax.tree.structure(a) != jax.tree.structure(b) or any(
      jnp.shape(x) != jnp.shape(y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))):
    return
  if bool(_trees_equal(a, b)):
    warnings.warn(f"{where}: the path's end points hold identical weights, so the path is one "
                  "model and its barrier is 0 by construction (not evidence of "
                  "connectivity). Pass two different models; for a deliberate control, "
                  "ignore input_checks.IdenticalEndpointsWarning.", IdenticalEndpointsWarning,
                  stacklevel=3)


def _finite_extent(x: jax.Array) -> jax.Array:
  """[min, max] of the finite entries of `x`, float32 ([inf, -inf] without any)."""
  ok = jnp.isfinite(x)
  return jnp.stack([jnp.min(jnp.where(ok, x, jnp.inf)),
                    jnp.max(jnp.where(ok, x, -jnp.inf))]).astype(jnp.float32)


def _variance_leaves(batch_stats) -> dict[str, jax.Array]:
  """{path: leaf} of the stored variances ('var' leaves, as Flax BatchNorm names them)."""
  return {finite.leaf_path(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(batch_stats)[0]
          if finite.leaf_path(path).split("/")[-1] == "var"}


@functools.partial(jax.jit, static_argnames=("num_outputs", "objective"))
def _input_flags(named_trees, eval_sets, bn_batches, batch_stats, *, num_outputs, objective):
  """({what: finite?}, {problem: absent?}, {images: [min, max]}, {var leaf: min}), one program."""
  finite_flags = {what: finite.all_finite(tree) for what, tree in named_trees.items()}
  valid_flags, image_extents = {}, {}
  mask_weights = objective.weights == "mask"
  sets = {f"eval set {name!r}": batches for name, batches in eval_sets.items()}
  if bn_batches is not None:
    sets["bn_batches"] = bn_batches
  for where, batches in sets.items():
    # Padding rows too: their loss is multiplied by a weight of 0, and NaN x 0 is NaN.
    for key, leaf in batches.items():
      what = "images" if key == IMAGE_KEY else f"{key!r} entries"
      of = "the BatchNorm " + what + " (bn_batches)" if where == "bn_batches" else (
          f"the {what} of {where}")
      finite_flags[of] = finite.all_finite(leaf)
      if key == IMAGE_KEY and reads_images(objective):
        image_extents[of] = _finite_extent(leaf)
  for name, batches in eval_sets.items():
    weights = jax.vmap(objective.weights_of)(batches)
    real = weights > 0
    if objective.check_targets is not None:
      valid = jax.vmap(objective.check_targets, in_axes=(0, None))(batches, num_outputs)
      what = (("labels", "classes") if objective.name == CLASSIFICATION.name
              else ("targets", "outputs"))
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
  variance_mins = {path: jnp.min(leaf).astype(jnp.float32)
                   for path, leaf in _variance_leaves(batch_stats).items()}
  return finite_flags, valid_flags, image_extents, variance_mins


def _images_out_of_range(image_extents: dict) -> list[str]:
  """[the problem] when some images range beyond MAX_ABS_IMAGE (uint8 scale), else []."""
  outside = {what: (float(lo), float(hi)) for what, (lo, hi) in image_extents.items()
             if np.isfinite([lo, hi]).all() and max(abs(lo), abs(hi)) > MAX_ABS_IMAGE}
  if not outside:
    return []
  return [", ".join(f"{what} range over [{lo:.4g}, {hi:.4g}]" for what, (lo, hi) in outside.items())
          + f"; expected normalised images within [-{MAX_ABS_IMAGE:g}, {MAX_ABS_IMAGE:g}] "
          "(normalised CIFAR, ImageNet and MNIST pixels lie within about +-3): for uint8-scale "
          "images divide by 255 and normalise by the dataset's mean and std (e.g. "
          f"mechconn.data.datasets.normalize); {OTHER_KEY_HINT}"]


def check_inputs(apply_fn: ApplyFn, named_params: dict[str, Params],
                 eval_sets: dict[str, StackedBatches],
                 bn_batches: StackedBatches | None = None,
                 objective: Objective = CLASSIFICATION, *,
                 batch_stats: Params | None = None, where: str = "Evaluation") -> None:
  """Raises unless all parameters and inputs are finite and in range, and the targets valid.

  One small compiled reduction over the data (no model evaluation), run before
  the evaluation itself, so that a bad input fails in seconds; the model's
  outputs are checked against the objective abstractly first (`check_outputs`).

  Args:
    apply_fn: the model's apply (its number of outputs bounds the targets).
    named_params: {description for messages: a params tree}; the first value
      is the model's 'params'.
    eval_sets: {name: stacked batches}.
    bn_batches: stacked batches for BatchNorm statistics, or None.
    objective: the objective the sets are evaluated with.
    batch_stats: the stored BatchNorm statistics inference reads, or None
      (their 'var' leaves must be >= 0).
    where: the caller, for the messages of `check_outputs`.

  Raises:
    ValueError: targets outside the model's outputs (labels outside its
      classes), a mask outside [0, 1] (negative weights), all weights zero
      (an eval set without a real example), images outside
      [-MAX_ABS_IMAGE, MAX_ABS_IMAGE] (uint8-scale images: the range found
      and the one expected), a negative stored variance (the leaf named), or
      model outputs the objective cannot read (`check_outputs`).
    finite.NonFiniteError: a NaN or infinity in the parameters or the stored
      statistics (the first bad leaf named), in an eval set's inputs (padding
      rows included: NaN x mask 0 is NaN), or in the BatchNorm inputs.
  """
  trees = dict(named_params)
  if batch_stats is not None:
    trees["the model's batch_stats"] = batch_stats
  num_outputs = check_outputs(apply_fn, next(iter(trees.values())),
                              next(iter(eval_sets.values())), objective, where)
  finite_flags, valid_flags, image_extents, variance_mins = jax.device_get(
      _input_flags(trees, dict(eval_sets), bn_batches, batch_stats or {},
                   num_outputs=num_outputs, objective=objective))
  invalid = [problem for problem, ok in valid_flags.items() if not ok]
  invalid += [f"the model's batch_stats leaf {path!r} holds a negative variance (min "
              f"{float(low):.3g}); variances are >= 0: recompute the statistics "
              "(batchnorm.recompute_batch_stats) or fix the checkpoint they came from"
              for path, low in variance_mins.items() if low < 0]
  invalid += _images_out_of_range(image_extents)
  if invalid:
    raise ValueError("Evaluation refused: " + "; ".join(invalid) + ".")
  named = {  # the first bad leaf of a tree, found on the host on the error path only
      (f"{what} (first at leaf {finite.first_nonfinite_leaf(trees[what])!r})"
       if not ok and what in trees else what): ok for what, ok in finite_flags.items()}
  finite.raise_if_any(named, "Evaluation refused")


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


def statistics_vary(stats) -> dict[str, jax.Array]:
  """{layer: scalar bool}: whether any unit of each renormalised layer varies (jittable).

  `stats`: BatchNorm's batch_stats ({...layer: {'mean', 'var'}}) or REPAIR's
  collection ({...site: {'stats': {'target_mean', 'target_std', ...}}}, the
  statistics each site is rescaled to). A unit is constant when its variance
  is at most CONSTANT_RELATIVE_VARIANCE x its squared mean; a layer whose
  every unit is constant outputs a constant, whatever its input.
  """
  per_layer: dict = {}
  for path, leaf in flax.traverse_util.flatten_dict(stats).items():
    layer = path[:-2] if path[-2:-1] == ("stats",) else path[:-1]
    per_layer.setdefault("/".join(map(str, layer)), {})[path[-1]] = leaf
  flags = {}
  for layer, s in per_layer.items():
    mean = s.get("target_mean", s.get("mean"))
    var = jnp.square(s["target_std"]) if "target_std" in s else s["var"]
    flags[layer] = jnp.any(var > CONSTANT_RELATIVE_VARIANCE * jnp.square(mean))
  return flags
