"""Permutation specs derived from any Flax model by tracing it.

A hidden unit can be renamed (its index permuted) without changing the network
whenever every operation that touches its axis either treats the positions of
that axis alike (elementwise maps, sums, matrix products over it) or reads the
same permutation on both sides. `derive_spec` traces `apply_fn` to a jaxpr and
follows every axis of every array through it:

- axes that must carry the same permutation are merged (a union-find over
  axis *factors*): the two operands of an elementwise op, a matmul's
  contracted axes, a convolution's input channels and kernel input axis, a
  residual add's two streams, ...;
- an axis that a reshape splits or merges is refined into factors, so a
  flatten of [H, W, C] into a Dense layer, or a Dense output split into
  [heads, head_dim], carries the permutation on its own factor (the spec then
  gives a *view shape* for that leaf: `PermutationSpec.shapes`);
- an axis is fixed (never permuted) where an operation depends on positions:
  the model's input and output, convolution and pooling windows, slices,
  padding, concatenation, iota, argmax, constants that vary along the axis.

What remains free and touches at least two parameter axes is a permutation
group. An operation with no rule here (or one that mixes units in a way a
per-axis permutation cannot express, such as concatenating two different
hidden groups) fixes its axes; if that would silently remove a group that
nothing else fixes, `derive_spec` raises `UnsupportedOperation` naming the
operation and the layer instead of returning a weaker spec. Likewise a model
that returns hidden units beside its result (`(logits, features)`: units a
layer reads, which only an output keeps from being permuted) is refused with
how to derive through the result: a spec that silently dropped those units
would leave them unaligned, and which output is the result is the user's to
say (a tuple's first is only a convention).
A spec with no group at all warns (`NoPermutationGroupWarning`): there is
nothing to align, and the matching functions refuse it. The rules per
primitive are `mechconn.axis_tracer`'s.
"""

from collections.abc import Callable
from typing import Any
import warnings

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp

from mechconn import align
from mechconn import finite
from mechconn import intercept
from mechconn.axis_classes import AxisClasses, Constraint
from mechconn.axis_tracer import AxisTracer


class UnsupportedOperation(ValueError):
  """An operation the derivation cannot follow decides a permutation group."""


class NoPermutationGroupWarning(UserWarning):
  """A derived spec has no permutation group: aligning with it would permute nothing."""


def derive_spec(apply_fn: Callable[..., Any], variables: dict, example_input,
                **apply_kwargs) -> align.PermutationSpec:
  """The `PermutationSpec` of any Flax Linen model, derived by tracing it.

  Args:
    apply_fn: `model.apply`; called as `apply_fn(variables, x, train=False,
      **apply_kwargs)` (inference mode: BatchNorm reads its statistics).
    variables: the model's variables ({'params', 'batch_stats'?, ...}); arrays
      or `jax.ShapeDtypeStruct`s (`jax.eval_shape(model.init, ...)`): only
      their shapes are read.
    example_input: an input batch, or its `jax.ShapeDtypeStruct`.
    **apply_kwargs: further keyword arguments of `apply_fn`.

  Returns:
    A spec over every leaf of `variables` whose groups are the model's
    hidden-unit permutations (named after the first parameter that writes
    them), with `sites` (every submodule whose output carries a group on its
    last axis, for activation matching) and `shapes` (view shapes of leaves
    whose axes a reshape factored).

  Raises:
    UnsupportedOperation: an operation without a rule here (or one mixing
      different groups along one axis) is all that keeps a group of parameter
      axes from being permuted; the message names the operation and the layer.
    ValueError: the model returns several arrays, one holding hidden units
      that a layer reads (e.g. `(logits, features)`); the message says how to
      derive through the others (`lambda v, x, **kw: model.apply(v, x, **kw)[0]`).

  Warns:
    NoPermutationGroupWarning: the spec has no group (nothing to align), with
      what fixed the axes the parameters share.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  names = [finite.leaf_path(path) for path, _ in leaves]
  closed, out_shapes, layer_paths = _trace(apply_fn, treedef, [leaf for _, leaf in leaves],
                                           example_input, apply_kwargs)
  tracer = AxisTracer()
  param_axes = [tracer.fresh(jnp.shape(leaf)) for _, leaf in leaves]
  input_axes = [tracer.fresh(jnp.shape(x), Constraint(True, "the model's input"))
                for x in jax.tree.leaves(example_input)]
  outs = tracer.run(closed.jaxpr, closed.consts, param_axes + input_axes)
  axes = tracer.axes
  num_outputs = len(jax.tree.leaves(out_shapes[0]))
  output_events = _fix_outputs(axes, out_shapes[0], outs[:num_outputs])

  factors, occurrences = _factors(axes, names, param_axes)
  groups = _free_groups(axes, occurrences)
  first_use = _first_use(closed.jaxpr, len(leaves))
  if num_outputs > 1:
    _refuse_hidden_outputs(tracer, occurrences, output_events, names, first_use)
  if not groups:
    warnings.warn(_no_group_message(axes, occurrences), NoPermutationGroupWarning, stacklevel=2)
  group_names = _group_names(groups, factors, names, first_use)
  spec_axes, shapes = _spec_axes(axes, factors, group_names)
  return align.PermutationSpec(
      spec_axes, _sites(axes, layer_paths, outs[num_outputs:], group_names), shapes=shapes)


def _factors(axes: AxisClasses, names: list[str], param_axes: list):
  """({leaf: the expanded factors of each axis}, {class: [(leaf, factor index)]})."""
  factors = {name: [axes.expand(a) for a in leaf_axes]
             for name, leaf_axes in zip(names, param_axes)}
  occurrences: dict[int, list[tuple[str, int]]] = {}
  for name, leaf in factors.items():
    for k, f in enumerate(f for fs in leaf for f in fs):
      occurrences.setdefault(f, []).append((name, k))
  return factors, occurrences


def _trace(apply_fn, treedef, values, example_input, apply_kwargs):
  """(closed jaxpr, output shapes, layer paths) of the model, in inference mode.

  The jaxpr returns the model's outputs, then the first array output of every
  layer (in call order) whose path is in the returned list of layer paths.
  """
  layer_paths = []  # the layers whose first outputs `traced` returns, in call order

  def traced(values, x):
    """(the model's outputs, [each layer's first output that is an array])."""
    order, outputs = [], {}  # layers in the order their calls begin

    def record(call, next_fun, args, kwargs):
      if call.method == "__call__" and call.path and call.path not in order:
        order.append(call.path)
      out = next_fun(*args, **kwargs)
      if call.method == "__call__" and isinstance(out, jax.Array):
        outputs.setdefault(call.path, out)
      return out

    with intercept.intercept(record):
      out = apply_fn(jax.tree_util.tree_unflatten(treedef, values), x, train=False,
                     **apply_kwargs)
    layer_paths[:] = [path for path in order if path in outputs]
    return out, [outputs[path] for path in layer_paths]

  closed, out_shapes = jax.make_jaxpr(traced, return_shape=True)(values, example_input)
  return closed, out_shapes, layer_paths


def _free_groups(axes: AxisClasses, occurrences: dict) -> dict[int, list[tuple[str, int]]]:
  """{class: its parameter axes} of the classes no operation fixes that two axes share.

  Raises UnsupportedOperation where an operation without a positional rule
  decides such a class.
  """
  groups = {}
  for root, where in occurrences.items():
    events = axes.events[root]
    if events and not any(e.positional for e in events) and len(where) > 1:
      raise UnsupportedOperation(
          f"Cannot derive a permutation spec: {events[0].text} decides whether the units of "
          f"{where[0][0]} and {len(where) - 1} other parameter axes "
          "can be permuted. Write the spec by hand (align.PermutationSpec) or express the "
          "operation with supported ones (see mechconn.symmetry).")
    if not events and len(where) > 1:
      groups[root] = where
  return groups


def _refuse_hidden_outputs(tracer: AxisTracer, occurrences: dict,
                           output_events: list[Constraint], names: list[str],
                           first_use: dict[int, int]) -> None:
  """Raises when hidden units (ones a layer reads) are kept from permuting only by outputs."""
  axes = tracer.axes
  read = set(axes.expand([f for a in tracer.contracted for f in a]))
  hidden_out = [root for root, where in occurrences.items()
                if root in read and len(where) > 1 and axes.events[root]
                and all(e in output_events for e in axes.events[root])]
  if hidden_out:
    raise ValueError(_hidden_outputs_message(axes, output_events, hidden_out, _writer(
        occurrences[hidden_out[0]], names, first_use)[-2:]))


def _group_names(groups: dict, factors: dict, names: list[str],
                 first_use: dict[int, int]) -> dict[int, str]:
  """{class: 'P_<module>' (or 'P_<module>:<axis>')}, named after the kernel writing it."""
  group_names = {}
  for root, where in sorted(groups.items(), key=lambda kv: _writer(kv[1], names, first_use)):
    leaf, axis = _writer(where, names, first_use)[-2:]
    module = leaf.split("/", 1)[1].rsplit("/", 1)[0]
    last = sum(len(fs) for fs in factors[leaf]) - 1
    name = f"P_{module}" if axis == last else f"P_{module}:{axis}"
    while name in group_names.values():
      name += "'"
    group_names[root] = name
  return group_names


def _spec_axes(axes: AxisClasses, factors: dict, group_names: dict[int, str]):
  """({leaf: group name or None per (view) axis}, {leaf: view shape where factored})."""
  spec_axes, shapes = {}, {}
  for name, leaf in factors.items():
    # An axis that a reshape factored needs a view only where a group is one of the factors.
    leaf = [fs if any(f in group_names for f in fs) else fs[:1] for fs in leaf]
    if any(len(fs) > 1 for fs in leaf):
      shapes[name] = tuple(axes.size[f] for fs in leaf for f in fs)
      spec_axes[name] = tuple(group_names.get(f) for fs in leaf for f in fs)
    else:
      spec_axes[name] = tuple(group_names.get(fs[0]) if fs else None for fs in leaf)
  return spec_axes, shapes


def _sites(axes: AxisClasses, layer_paths: list, layer_axes: list,
           group_names: dict[int, str]) -> dict[str, tuple]:
  """{group: the layers whose output carries it on its last axis (and no group elsewhere)}."""
  sites: dict[str, list[tuple[str, ...]]] = {}
  for module, a in zip(layer_paths, layer_axes):
    if not a:
      continue
    last = axes.expand(a[-1])
    # A site's other axes must be positions (examples, pixels, tokens), not other units.
    others_fixed = not any(f in group_names for axis in a[:-1] for f in axes.expand(axis))
    if len(last) == 1 and last[0] in group_names and others_fixed:
      sites.setdefault(group_names[last[0]], []).append(module)
  return {k: tuple(v) for k, v in sites.items()}


def _fix_outputs(axes: AxisClasses, out_tree, outs) -> list[Constraint]:
  """Fixes every axis of the model's outputs; the constraint of each output, in order."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(out_tree)[0]]
  events = [Constraint(True, f"the model's output {path}".rstrip()) for path in paths]
  for event, a in zip(events, outs):
    for axis in a:
      axes.fix(axis, event)
  return events


def _hidden_outputs_message(axes: AxisClasses, output_events: list[Constraint],
                            hidden_out: list[int], example: tuple[str, int]) -> str:
  """Why a model returning hidden units beside its result has no full spec; how to derive."""
  name = lambda event: event.text.removeprefix("the model's output ")
  carrying = {e for root in hidden_out for e in axes.events[root]}
  clean = [name(e) for e in output_events if e not in carrying] or [name(output_events[0])]
  return (f"Cannot derive a permutation spec: the model returns {len(output_events)} arrays "
          f"({', '.join(name(e) for e in output_events)}), and "
          f"{', '.join(name(e) for e in output_events if e in carrying)} holds hidden units "
          f"that its layers read ({len(hidden_out)} group(s) of parameter axes, e.g. "
          f"{example[0]} axis {example[1]}): permuting them changes that output, so the spec "
          f"would leave them unaligned. To align the model as a function of {clean[0]}, derive "
          "the spec (and align) through it alone: derive_spec(lambda v, x, **kw: "
          f"model.apply(v, x, **kw){clean[0]}, variables, x).")


def _no_group_message(axes: AxisClasses, occurrences: dict) -> str:
  """Why a derived spec has no group: what fixed the axes that parameters share."""
  shared = [root for root, where in occurrences.items() if len(where) > 1]
  why = sorted({e.text for root in shared for e in axes.events[root]})
  reason = (f"every axis shared by two parameters is fixed by {', '.join(why)}" if why else
            "no axis is shared by two parameters (a model of one layer?)")
  return (f"derive_spec: the derived spec has no permutation group ({reason}), so aligning "
          "with it would permute nothing (weight_matching and activation_matching refuse such "
          "a spec). A model without hidden units has none; a model that outputs its hidden "
          "units cannot permute them.")


def _first_use(jaxpr, num_leaves: int) -> dict[int, int]:
  """{leaf index: the first top-level equation reading it}."""
  position = {v: i for i, v in enumerate(jaxpr.invars[:num_leaves])}
  first = {}
  for n, eqn in enumerate(jaxpr.eqns):
    for v in eqn.invars:
      if not isinstance(v, jax_core.Literal) and v in position:
        first.setdefault(position[v], n)
  return first


def _writer(where: list[tuple[str, int]], names: list[str], first_use: dict[int, int]):
  """The parameter axis that names a group: the first kernel (in the computation) carrying it.

  Returns a sort key whose last two entries are (leaf path, axis).
  """
  return min((not n.endswith("/kernel"), not n.startswith("params/"),
              first_use.get(names.index(n), len(names)), -axis, n, axis) for n, axis in where)
