"""Permutations of hidden units: specs, and how a permutation acts on the variables.

Permuting a hidden layer's units (and the next layer's inputs to match) leaves a
network's function unchanged. To compare two networks along a linear path up to
this symmetry, permute one (`other`) to best match the other (`reference`)
before interpolating (Ainsworth, Hayase, Srinivasa, "Git Re-Basin", 2023;
Entezari et al. 2022).

A `PermutationSpec` says, for every leaf of the variables (slash-joined paths
such as 'params/Conv_1/kernel' or 'batch_stats/BatchNorm_1/mean'), which
permutation acts on each axis (None: no permutation); and, for activation
matching, which module outputs carry each permutation on their last axis.
Specs are declared per architecture (`permutation_spec`) or derived from any
model by tracing it (`symmetry.derive_spec`); finding the permutation that
aligns two networks is `matching`'s.

A permutation `perm` maps each permutation name to an index array: unit i of
the aligned model is unit `perm[name][i]` of `other`. So
`apply_permutation(spec, perm, other)` takes `perm[name]` along each axis that
carries `name`.

What the functions take: a function that reads only parameters (the spec
helpers, `weight_matching`) takes a params tree or the full variables
({'params', 'batch_stats'?, ...}: its 'params' are used); a function that runs
the network (`activation_matching`) takes the full variables;
`apply_permutation` takes either and returns the kind it was given.
"""

from collections.abc import Mapping
import dataclasses
import warnings

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np

from mechconn import finite
from mechconn import paths
from mechconn import trees

Params = chex.ArrayTree
Permutation = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class PermutationSpec:
  """Which permutation acts on which axis of which leaf.

  Attributes:
    axes: {leaf path: (permutation name or None per axis)}; leaf paths are
      '/'-joined keys of the variables dict, e.g. 'params/head/kernel'.
    sites: {permutation name: module paths (tuples of names) whose outputs
      carry the permutation on their last axis}, for activation matching.
    shapes: {leaf path: view shape} for leaves whose `axes` refer to a
      reshaped view (a Dense kernel after a flatten of [H, W, C] is viewed as
      [H, W, C, out] so that C carries the permutation); other leaves are
      taken as they are. Derived specs (`symmetry.derive_spec`) fill it.
  """

  axes: dict[str, tuple[str | None, ...]]
  sites: dict[str, tuple[tuple[str, ...], ...]]
  shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

  def view(self, path: str, leaf):
    """The leaf as the spec's axes see it."""
    return leaf.reshape(self.shapes[path]) if path in self.shapes else leaf

  @property
  def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for path, perms in self.axes.items():
      for axis, p in enumerate(perms):
        if p is not None:
          out.setdefault(p, []).append((path, axis))
    return out

  @property
  def names(self) -> list[str]:
    return sorted(self.perm_to_axes)


# --- Declaring specs: one helper per layer kind, composed per architecture. ----


def _conv(name: str, p_in: str | None, p_out: str) -> dict:
  return {f"params/{name}/kernel": (None, None, p_in, p_out)}


def _dense(name: str, p_in: str | None, p_out: str | None) -> dict:
  return {f"params/{name}/kernel": (p_in, p_out), f"params/{name}/bias": (p_out,)}


def _norm(name: str, p: str) -> dict:
  return {f"params/{name}/scale": (p,), f"params/{name}/bias": (p,),
          f"batch_stats/{name}/mean": (p,), f"batch_stats/{name}/var": (p,)}


def _prefixed(prefix: str, axes: dict) -> dict:
  return {path.replace("/", f"/{prefix}/", 1): perms for path, perms in axes.items()}


def mlp_spec(num_hidden: int) -> PermutationSpec:
  """Dense_i's units are P_i; the head reads P_{last}."""
  axes, sites = {}, {}
  for i in range(num_hidden):
    axes.update(_dense(f"Dense_{i}", f"P_{i - 1}" if i else None, f"P_{i}"))
    sites[f"P_{i}"] = ((f"Dense_{i}",),)
  axes.update(_dense("head", f"P_{num_hidden - 1}", None))
  return PermutationSpec(axes, sites)


def conv_chain_spec(num_convs: int) -> PermutationSpec:
  """Conv_i + BatchNorm_i share P_i (SmallCNN, VGG13); the head reads P_{last}."""
  axes, sites = {}, {}
  for i in range(num_convs):
    axes.update(_conv(f"Conv_{i}", f"P_{i - 1}" if i else None, f"P_{i}"))
    axes.update(_norm(f"BatchNorm_{i}", f"P_{i}"))
    sites[f"P_{i}"] = ((f"BatchNorm_{i}",),)
  axes.update(_dense("head", f"P_{num_convs - 1}", None))
  return PermutationSpec(axes, sites)


def resnet18_spec() -> PermutationSpec:
  """ResNet18: one permutation per residual stream (stage), one inside each block.

  The residual stream of stage s is P_res{s}: the stem writes P_res1, and
  identity shortcuts force every block of a stage to read and write the same
  permutation; the first block of stages 2-4 maps P_res{s-1} to P_res{s}
  through its shortcut conv.
  """
  axes = {**_conv("stem_conv", None, "P_res1"), **_norm("stem_bn", "P_res1")}
  sites = {"P_res1": [("stem_bn",)]}
  for stage in range(1, 5):
    res = f"P_res{stage}"
    sites.setdefault(res, [])
    for block in range(2):
      name = f"layer{stage}_{block}"
      inner = f"P_{name}"
      res_in = f"P_res{stage - 1}" if stage > 1 and block == 0 else res
      block_axes = {**_conv("Conv_0", res_in, inner), **_norm("BatchNorm_0", inner),
                    **_conv("Conv_1", inner, res), **_norm("BatchNorm_1", res)}
      if stage > 1 and block == 0:
        block_axes.update({**_conv("shortcut_conv", res_in, res),
                           **_norm("shortcut_bn", res)})
      axes.update(_prefixed(name, block_axes))
      sites[inner] = [(name, "BatchNorm_0")]
      sites[res].append((name,))
  axes.update(_dense("head", "P_res4", None))
  return PermutationSpec(axes, {k: tuple(v) for k, v in sites.items()})


# The built-in models whose specs are written here (equal to the derived ones: tested).
WRITTEN_SPECS = ("mlp", "resnet18", "small_cnn", "vgg13")


def permutation_spec(model_name: str, params: Params) -> PermutationSpec:
  """The spec of a model by its name in `mechconn.models.MODELS`, sized from its params.

  Args:
    model_name: 'mlp', 'small_cnn', 'vgg13' or 'resnet18' (`WRITTEN_SPECS`).
    params: the model's params, or its full variables (their 'params' are read).

  Example:
    spec = permutation_spec("small_cnn", variables["params"])
  """
  params = _params_of(params, "permutation_spec(model_name, params)", "params")
  if model_name == "mlp":
    return mlp_spec(sum(k.startswith("Dense_") for k in params))
  if model_name in ("small_cnn", "vgg13"):
    return conv_chain_spec(sum(k.startswith("Conv_") for k in params))
  if model_name == "resnet18":
    return resnet18_spec()
  raise ValueError(f"No permutation spec for model {model_name!r}; valid: "
                   f"{list(WRITTEN_SPECS)} (any other model: symmetry.derive_spec).")


# --- What the public functions take. -------------------------------------------------


def _kind(arg) -> str:
  """What an argument is, in words, for an error message."""
  if isinstance(arg, PermutationSpec):
    return "a PermutationSpec"
  if isinstance(arg, Mapping):
    return "a dict of variables" if "params" in arg else "a dict of parameters"
  return f"a {type(arg).__name__}"


def _check_spec_arg(spec, where: str, position: str = "first") -> None:
  """Raises TypeError unless `spec` is a PermutationSpec."""
  if not isinstance(spec, PermutationSpec):
    raise TypeError(f"`{where}`: the {position} argument must be a PermutationSpec (got "
                    f"{_kind(spec)}; arguments swapped?)")


def check_has_groups(spec: PermutationSpec, where: str) -> None:
  """Raises ValueError if `spec` has no permutation group: aligning would permute nothing."""
  if not spec.perm_to_axes:
    raise ValueError(f"`{where}`: the permutation spec has no permutation group (no axis of its "
                     f"{len(spec.axes)} leaves carries one), so there is nothing to permute and "
                     "aligning would return the model unchanged. A model without hidden units "
                     "has none; a derived spec of a model with hidden units that has none says "
                     "why in derive_spec's warning.")


def _params_of(tree, where: str, name: str) -> Params:
  """The params of a params tree or of full variables (a top-level 'params' key)."""
  if not isinstance(tree, Mapping):
    swapped = "; arguments swapped?" if isinstance(tree, PermutationSpec) else ""
    raise TypeError(f"`{where}`: `{name}` must be params or the full variables {{'params', "
                    f"...}} (got {_kind(tree)}{swapped})")
  return tree["params"] if "params" in tree else tree


def _check_variables_arg(tree, where: str, name: str) -> None:
  """Raises unless `tree` is the full variables (a dict with a top-level 'params' key)."""
  _params_of(tree, where, name)
  if "params" not in tree:
    raise ValueError(f"`{where}`: `{name}` runs the network: pass the full variables "
                     "{'params', 'batch_stats'} ({'params': params} for a model without "
                     "state), not a dict of parameters without a 'params' key")


# --- Applying a permutation. ------------------------------------------------------


def flatten_variables(variables: dict) -> dict[str, jax.Array]:
  """{'/'-joined leaf path: leaf}, the keys of `PermutationSpec.axes`."""
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(variables).items()}


def _unflat(flat: dict[str, jax.Array]) -> dict:
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def check_spec(spec: PermutationSpec, variables: dict) -> None:
  """Raises ValueError unless the spec covers exactly the variables' leaves."""
  flat = flatten_variables(variables)
  covered = {p for p in spec.axes if p.split("/")[0] in variables}
  missing, extra = sorted(set(flat) - covered), sorted(covered - set(flat))
  if missing or extra:
    raise ValueError(f"Permutation spec does not match the variables: leaves without a spec "
                     f"{missing[:5]}, spec entries without a leaf {extra[:5]}.")
  for path, perms in spec.axes.items():
    if path not in flat:
      continue
    shape = flat[path].shape
    if path in spec.shapes and int(np.prod(spec.shapes[path])) != int(np.prod(shape)):
      raise ValueError(f"Spec view {spec.shapes[path]} of {path!r} does not fit the leaf's "
                       f"shape {shape}.")
    if len(perms) != len(spec.shapes.get(path, shape)):
      raise ValueError(f"Spec for {path!r} has {len(perms)} axes but the leaf has shape "
                       f"{spec.shapes.get(path, shape)}.")


_UNSET = object()  # `apply_permutation`'s deprecated `batch_stats` was not passed


def apply_permutation(spec: PermutationSpec, perm: Permutation, tree: Params,
                      batch_stats=_UNSET) -> Params:
  """Permutes the units of a network by `perm`: it computes the same function.

  Args:
    spec: the architecture's spec.
    perm: {name: index array}; unit i of the result is unit `perm[name][i]`.
    tree: the full variables ({'params', 'batch_stats'?, ...}; every collection
      the spec covers is permuted, BatchNorm statistics with their units), or a
      params tree.
    batch_stats: deprecated (pass the variables as `tree`); given, the old
      form's (params, batch_stats) tuple is returned.

  Returns:
    `tree` permuted, of the same kind: variables for variables, params for params.

  Example:
    aligned = apply_permutation(spec, perm, variables)   # {'params', 'batch_stats'}
    aligned_params = apply_permutation(spec, perm, variables["params"])
  """
  call = "apply_permutation(spec, perm, tree)"
  _check_spec_arg(spec, call)
  params = _params_of(tree, call, "tree")
  if batch_stats is not _UNSET:
    warnings.warn("apply_permutation(spec, perm, params, batch_stats) is deprecated and will "
                  "be removed in the next release: call apply_permutation(spec, perm, "
                  "variables) with variables = {'params': params, 'batch_stats': "
                  "batch_stats}; it returns variables.", DeprecationWarning, stacklevel=2)
    if params is not tree:
      raise TypeError(f"`{call}`: the deprecated `batch_stats` goes with params, not with "
                      "the full variables; pass the variables alone.")
    if batch_stats is None:
      return apply_permutation(spec, perm, params)
    variables = trees.variables_of(params, batch_stats)
    out = apply_permutation(spec, perm, variables)
    return out["params"], out.get("batch_stats", batch_stats)
  if not isinstance(perm, Mapping):
    raise TypeError(f"`{call}`: `perm` must be a dict {{name: index array}} (got "
                    f"{_kind(perm)})")
  variables = tree if params is not tree else {"params": params}
  check_spec(spec, variables)
  for name, n in group_sizes(spec, params).items():
    if name not in perm:
      raise ValueError(f"The permutation has no group {name!r}; it needs {spec.names}.")
    indices = np.asarray(perm[name])
    if indices.shape != (n,) or not np.array_equal(np.sort(indices), np.arange(n)):
      raise ValueError(f"perm[{name!r}] must be a permutation of range({n}) (the group's "
                       f"units), got {indices.tolist()[:12]} (shape {indices.shape}).")
  flat = flatten_variables(variables)
  for path, leaf in flat.items():
    shape, leaf = leaf.shape, spec.view(path, leaf)
    for axis, p in enumerate(spec.axes[path]):
      if p is not None:
        leaf = jnp.take(leaf, jnp.asarray(perm[p]), axis=axis)
    flat[path] = leaf.reshape(shape)
  out = {**variables, **_unflat(flat)}  # empty collections ({} batch_stats) kept as given
  return out if variables is tree else out["params"]


def group_sizes(spec: PermutationSpec, params: Params) -> dict[str, int]:
  """{group: number of units}, read from the params (or the full variables' params).

  Example:
    group_sizes(mlp_spec(2), params)   # {'P_0': 512, 'P_1': 512}
  """
  call = "group_sizes(spec, params)"
  _check_spec_arg(spec, call)
  flat = flatten_variables({"params": _params_of(params, call, "params")})
  return {name: next(spec.view(p, flat[p]).shape[a] for p, a in where if p in flat)
          for name, where in spec.perm_to_axes.items()}


def identity_permutation(spec: PermutationSpec, params: Params) -> Permutation:
  """Every group in its own order (applying it changes nothing).

  Args:
    spec: the architecture's spec.
    params: params, or the full variables (their 'params' give the group sizes).

  Example:
    perm = identity_permutation(spec, variables)   # {'P_0': array([0, 1, ...]), ...}
  """
  _check_spec_arg(spec, "identity_permutation(spec, params)")
  return {name: np.arange(n) for name, n in group_sizes(spec, params).items()}


def random_permutation(spec: PermutationSpec, params: Params, seed: int) -> Permutation:
  """A uniformly random permutation of every group (for tests and null baselines).

  Args:
    spec: the architecture's spec.
    params: params, or the full variables (their 'params' give the group sizes).
    seed: numpy seed of the permutations.

  Example:
    shuffled = apply_permutation(spec, random_permutation(spec, variables, 0), variables)
  """
  _check_spec_arg(spec, "random_permutation(spec, params, seed)")
  rng = np.random.default_rng(seed)
  return {name: rng.permutation(n) for name, n in sorted(group_sizes(spec, params).items())}


def check_pair(spec: PermutationSpec, reference: Params, other: Params) -> None:
  """Raises ValueError unless both models fit the spec and have the same leaves and shapes.

  Reads only the params: `reference` and `other` are params trees or full
  variables (their 'params'). Names the spec's missing or extra leaves (a spec
  of another architecture), or the first leaf whose shape differs (models of
  different widths); raises `finite.NonFiniteError` naming the first NaN or
  infinite leaf, and TypeError for an argument of the wrong kind.

  Example:
    check_pair(spec, variables_a, variables_b)   # or their params
  """
  call = "check_pair(spec, reference, other)"
  _check_spec_arg(spec, call)
  reference, other = _params_of(reference, call, "reference"), _params_of(other, call, "other")
  for name, params in (("reference", reference), ("other", other)):
    try:
      check_spec(spec, {"params": params})
    except ValueError as e:
      raise ValueError(f"The permutation spec does not fit the {name} model (a spec of "
                       f"another architecture?): {e}") from None
  try:
    paths.check_matching((reference, other))
  except ValueError as e:
    raise ValueError("Only models of one architecture and width can be aligned (point 0 is "
                     f"the reference, point 1 the other): {e}") from None
  for name, params in (("reference", reference), ("other", other)):
    if not bool(finite.all_finite_jit(params)):
      raise finite.NonFiniteError(f"The {name} model's parameters hold NaN or infinity "
                                  f"(first at {finite.first_nonfinite_leaf(params)}); they "
                                  "cannot be aligned.")
