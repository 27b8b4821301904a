"""Parameter groups: which leaves of a parameter tree move together in a diagnostic.

Layer-wise barriers (`diagnostics.layerwise`) move one group along a path while
the rest stays at an end point; curvature (`diagnostics.curvature`) can be
restricted to a group's block of the Hessian. A group is a set of leaf paths,
'/'-joined keys under the parameters (e.g. 'Conv_0/kernel'). Groups come from:

  - None: the model's top-level submodules ('Conv_0', 'Dense_0', ...; a tree
    with a single top-level entry is entered until there are several);
  - a sequence of prefixes, each its own group (['Conv_0', 'block1/conv']);
  - a mapping {group name: prefixes} ({'features': ['Conv_0', 'Conv_1']});
  - an `align.PermutationSpec`: one group per permutation, the leaves whose
    last axis it permutes (the layer that produces those features, with its
    norm), and 'unpermuted' for the leaves no permutation reaches that way
    (the head).

Groups need not cover the tree or be disjoint; each must hold at least one leaf.
"""

from collections.abc import Mapping, Sequence

import jax

from mechconn import align
from mechconn.types import Params

Groups = None | Sequence[str] | Mapping[str, Sequence[str]] | align.PermutationSpec


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_paths(params: Params) -> list[str]:
  """The '/'-joined key path of every leaf, in the tree's order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return ["/".join(_key_name(k) for k in path) for path, _ in flat]


def _matching(paths: list[str], prefix: str) -> tuple[str, ...]:
  prefix = prefix.strip("/")
  return tuple(p for p in paths if p == prefix or p.startswith(prefix + "/"))


def _in_model_order(params, prefix: str = "") -> list[str]:
  """Leaf paths in the order the model declared them (dict order), not sorted."""
  if isinstance(params, Mapping):
    return [p for key, value in params.items()
            for p in _in_model_order(value, f"{prefix}{key}/")]
  return [prefix.rstrip("/")]


def _top_level(paths: list[str], order: list[str] | None = None) -> dict[str, tuple[str, ...]]:
  order = order if order and sorted(order) == sorted(paths) else paths
  depth = 0
  while True:
    heads = list(dict.fromkeys("/".join(p.split("/")[:depth + 1]) for p in order))
    if len(heads) > 1 or all(h == p for h, p in zip(heads, order)):
      return {h: _matching(paths, h) for h in heads}
    depth += 1


def _from_spec(spec: align.PermutationSpec, paths: list[str]) -> dict[str, tuple[str, ...]]:
  owner = {}
  for path, perms in spec.axes.items():
    key = path.removeprefix("params/")
    if key in paths and perms and perms[-1] is not None:
      owner[key] = perms[-1]
  groups = {name: tuple(p for p in paths if owner.get(p) == name) for name in spec.names}
  groups = {name: leaves for name, leaves in groups.items() if leaves}
  rest = tuple(p for p in paths if p not in owner)
  return {**groups, **({"unpermuted": rest} if rest else {})}


def parameter_groups(params: Params, groups: Groups = None) -> dict[str, tuple[str, ...]]:
  """{group name: leaf paths} (see the module docstring); a named error for an empty group."""
  paths = leaf_paths(params)
  if not paths:
    raise ValueError("parameter_groups: the parameter tree has no leaves.")
  if groups is None:
    return _top_level(paths, _in_model_order(params))
  if isinstance(groups, align.PermutationSpec):
    return _from_spec(groups, paths)
  if isinstance(groups, str) or not isinstance(groups, Sequence | Mapping):
    raise TypeError("groups must be None, a list of prefixes, {name: prefixes} or a "
                    f"PermutationSpec; got {type(groups).__name__}.")
  named = groups if isinstance(groups, Mapping) else {g: (g,) for g in groups}
  if not named:
    raise ValueError("groups is empty; give at least one group (or None for the model's "
                     "top-level submodules).")
  out = {}
  for name, prefixes in named.items():
    prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
    leaves = tuple(dict.fromkeys(p for prefix in prefixes for p in _matching(paths, prefix)))
    if not leaves:
      tops = sorted(_top_level(paths))
      raise ValueError(f"Group {name!r} ({list(prefixes)}) matches no parameter; prefixes "
                       f"are '/'-joined keys, e.g. {tops[:6]}.")
    out[str(name)] = leaves
  return out


def group_mask(params: Params, leaves: Sequence[str]) -> Params:
  """A tree like `params` of Python bools: True on the group's leaves."""
  chosen = set(leaves)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  return jax.tree_util.tree_unflatten(
      treedef, ["/".join(_key_name(k) for k in path) in chosen for path, _ in flat])
