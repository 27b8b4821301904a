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
operation and the layer instead of returning a weaker spec.
"""

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

from mechconn import align
from mechconn import intercept
from mechconn.axis_classes import AxisClasses, Constraint


class UnsupportedOperation(ValueError):
  """An operation the derivation cannot follow decides a permutation group."""


# Primitives that act on each position of their (equally shaped or scalar)
# operands alone.
ELEMENTWISE = frozenset("""
abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp conj convert_element_type
copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow
is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow real
reduce_precision rem round rsqrt select_n sign sin sinh sqrt square sub tan tanh xor
""".split())
# Reductions that treat the positions of the reduced axes alike.
SYMMETRIC_REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor".split())
# Primitives that pass their operands through unchanged.
IDENTITIES = frozenset(
    "optimization_barrier sharding_constraint mesh_cast pvary stop_gradient".split())
# Primitives whose body is a jaxpr, and the parameter holding it.
CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
         "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
         "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr",
         "custom_lin": None}


@dataclasses.dataclass
class _Tracer:
  axes: AxisClasses = dataclasses.field(default_factory=AxisClasses)

  def fresh(self, shape, event=None) -> list[list[int]]:
    return [self.axes.new(int(s), event) for s in shape]

  # --- Walking a jaxpr. -----------------------------------------------------------

  def run(self, jaxpr, consts, in_axes, layer: str = "") -> list[list[list[int]]]:
    env = {}

    def read(v):
      if isinstance(v, jax_core.Literal):
        return self._constant_axes(np.asarray(v.val), layer)
      return env[v]

    for v, c in zip(jaxpr.constvars, consts):
      env[v] = self._constant_axes(np.asarray(c), layer)
    for v, a in zip(jaxpr.invars, in_axes):
      env[v] = a
    for eqn in jaxpr.eqns:
      where = str(eqn.source_info.name_stack) or layer or "the model's top level"
      outs = self.equation(eqn, [read(v) for v in eqn.invars], where)
      for v, a in zip(eqn.outvars, outs):
        env[v] = a
    return [read(v) for v in jaxpr.outvars]

  def _constant_axes(self, value: np.ndarray, layer: str):
    axes = []
    for i, s in enumerate(value.shape):
      varies = s > 1 and not np.all(value == np.take(value, [0], axis=i))
      axes.append(self.axes.new(s, Constraint(True, f"a constant that varies along it ({layer})")
                                if varies else None))
    return axes

  def equation(self, eqn, ins, where):
    name = eqn.primitive.name
    p = eqn.params
    shapes = [tuple(v.aval.shape) for v in eqn.invars]
    out_shapes = [tuple(v.aval.shape) for v in eqn.outvars]
    here = f"'{name}' in {where}"
    if name in CALLS and CALLS[name] and CALLS[name] in p:
      body = p[CALLS[name]]
      inner, consts = (body.jaxpr, body.consts) if hasattr(body, "jaxpr") else (body, ())
      n = len(ins) - len(inner.invars)
      return self.run(inner, consts, ins[n:], where)
    if name in ELEMENTWISE:
      out = self.fresh(out_shapes[0])
      for a, s in zip(ins, shapes):
        if len(s) == len(out_shapes[0]):
          for i, (si, so) in enumerate(zip(s, out_shapes[0])):
            if si == so:
              self.axes.unify(a[i], out[i], Constraint(False, here))
      return [out]
    if name in IDENTITIES:
      return list(ins)
    if name in SYMMETRIC_REDUCTIONS:
      return [[a for i, a in enumerate(ins[0]) if i not in p["axes"]]]
    if name in ("argmax", "argmin"):
      for i in p["axes"]:
        self.axes.fix(ins[0][i], Constraint(True, here))
      return [[a for i, a in enumerate(ins[0]) if i not in p["axes"]]]
    if name in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"):
      self.axes.fix(ins[0][p["axis"]], Constraint(True, here))
      return [list(ins[0])]
    if name == "broadcast_in_dim":
      out = self.fresh(p["shape"])
      for i, d in enumerate(p["broadcast_dimensions"]):
        if shapes[0][i] == p["shape"][d]:
          out[d] = ins[0][i]
      return [out]
    if name == "transpose":
      return [[ins[0][i] for i in p["permutation"]]]
    if name == "squeeze":
      return [[a for i, a in enumerate(ins[0]) if i not in p["dimensions"]]]
    if name == "reshape" and p.get("dimensions") is None:
      return [self.reshape(ins[0], out_shapes[0], Constraint(False, here))]
    if name == "dot_general":
      return [self.dot_general(ins, shapes, p["dimension_numbers"], here)]
    if name == "conv_general_dilated":
      return [self.conv(ins, out_shapes[0], p, here)]
    if name in ("reduce_window_sum", "reduce_window_max", "reduce_window_min"):
      return [self.window(ins[0], out_shapes[0], p, here)]
    if name in ("slice", "dynamic_slice", "pad", "rev"):
      return [self.positional(ins[0], shapes[0], out_shapes[0], name, p, here)]
    if name == "concatenate":
      return [self.concatenate(ins, out_shapes[0], p["dimension"], here)]
    if name == "iota":
      out = self.fresh(out_shapes[0])
      self.axes.fix(out[p["dimension"]], Constraint(True, here))
      return [out]
    # No rule: nothing is known about how it treats positions.
    event = Constraint(False, f"{here} (no rule for this operation)")
    for a in ins:
      for axis in a:
        self.axes.fix(axis, event)
    return [self.fresh(s, event) for s in out_shapes]

  # --- Rules with structure. ------------------------------------------------------

  def reshape(self, axes, out_shape, event):
    """Regroups the factors of `axes` into `out_shape`, refining a factor that straddles."""
    flat = self.axes.expand([f for a in axes for f in a])
    out = []
    for size in out_shape:
      taken, have = [], 1
      while have < size and flat:
        taken.append(flat.pop(0))
        have *= self.axes.size[taken[-1]]
      if have > size:  # the last factor straddles the boundary: refine it
        before = have // self.axes.size[taken[-1]]
        if size % before or self.axes.size[taken[-1]] % (size // before):
          # no common refinement (e.g. [3, 4] into [2, 6]): every axis here is fixed
          self.axes.fix([f for a in axes for f in a], event)
          return self.fresh(out_shape, event)
        head, tail = self.axes.split(taken.pop(), size // before)
        taken.append(head)
        flat.insert(0, tail)
      out.append(taken)
    return out

  def dot_general(self, ins, shapes, dimension_numbers, here):
    (lc, rc), (lb, rb) = dimension_numbers
    lhs, rhs = ins
    event = Constraint(False, here)
    for i, j in zip(lc, rc):
      self.axes.unify(lhs[i], rhs[j], event)
    for i, j in zip(lb, rb):
      self.axes.unify(lhs[i], rhs[j], event)
    free_l = [lhs[i] for i in range(len(shapes[0])) if i not in lc and i not in lb]
    free_r = [rhs[j] for j in range(len(shapes[1])) if j not in rc and j not in rb]
    return [lhs[i] for i in lb] + free_l + free_r

  def conv(self, ins, out_shape, p, here):
    lhs, rhs = ins[:2]
    dn = p["dimension_numbers"]
    out = self.fresh(out_shape)
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
      event = Constraint(False, f"{here} (grouped convolution)")
      for a in lhs + rhs + out:
        self.axes.fix(a, event)
      return out
    window = Constraint(True, f"the window of {here}")
    self.axes.unify(lhs[dn.lhs_spec[1]], rhs[dn.rhs_spec[1]], Constraint(False, here))
    out[dn.out_spec[1]] = rhs[dn.rhs_spec[0]]
    out[dn.out_spec[0]] = lhs[dn.lhs_spec[0]]
    for spec, axes in ((dn.lhs_spec, lhs), (dn.rhs_spec, rhs), (dn.out_spec, out)):
      for d in spec[2:]:
        self.axes.fix(axes[d], window)
    return out

  def window(self, axes, out_shape, p, here):
    kept = [p["window_dimensions"][i] == 1 and p["window_strides"][i] == 1
            and tuple(p["padding"][i]) == (0, 0) and p["base_dilation"][i] == 1
            and p["window_dilation"][i] == 1 for i in range(len(axes))]
    return self._keep_or_fix(axes, out_shape, kept, Constraint(True, f"the window of {here}"))

  def positional(self, axes, shape, out_shape, name, p, here):
    if name == "pad":
      kept = [tuple(c) == (0, 0, 0) for c in p["padding_config"]]
    elif name == "rev":
      kept = [i not in p["dimensions"] for i in range(len(axes))]
    else:
      kept = [shape[i] == out_shape[i] and (name != "slice" or p["strides"] is None
                                            or p["strides"][i] == 1) for i in range(len(axes))]
    return self._keep_or_fix(axes, out_shape, kept, Constraint(True, here))

  def _keep_or_fix(self, axes, out_shape, kept, event):
    """Output axes: the input's where `kept`, else fresh, both sides fixed with `event`."""
    out = self.fresh(out_shape)
    for i, a in enumerate(axes):
      if kept[i]:
        out[i] = a
      else:
        self.axes.fix(a, event)
        self.axes.fix(out[i], event)
    return out

  def concatenate(self, ins, out_shape, dim, here):
    out = self.fresh(out_shape)
    for a in ins:
      for i in range(len(out_shape)):
        if i != dim:
          self.axes.unify(a[i], out[i], Constraint(False, here))
    blocks = [self.axes.expand(a[dim]) for a in ins]
    if all(b == blocks[0] for b in blocks) and blocks[0]:
      # copies of one axis side by side (e.g. convolution patches): each block
      # carries the same permutation, the block index is positional.
      return out[:dim] + [self.axes.new(len(ins), Constraint(True, here)) + blocks[0]] + out[dim + 1:]
    for b in blocks:
      self.axes.fix(b, Constraint(False, f"{here} (joins different axes along one axis)"))
    self.axes.fix(out[dim], Constraint(True, here))
    return out


def _leaf_path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


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
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  names = [_leaf_path(path) for path, _ in leaves]

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

  closed, out_shapes = jax.make_jaxpr(traced, return_shape=True)(
      [leaf for _, leaf in leaves], example_input)
  tracer = _Tracer()
  param_axes = [tracer.fresh(jnp.shape(leaf)) for _, leaf in leaves]
  input_axes = [tracer.fresh(jnp.shape(x), Constraint(True, "the model's input"))
                for x in jax.tree.leaves(example_input)]
  outs = tracer.run(closed.jaxpr, closed.consts, param_axes + input_axes)
  out_paths = [_leaf_path(path) for path, _ in
               jax.tree_util.tree_flatten_with_path(out_shapes)[0]]
  axes = tracer.axes
  for path, a in zip(out_paths, outs):
    if not path.startswith("1/"):  # the model's own outputs (not its intermediates)
      for axis in a:
        axes.fix(axis, Constraint(True, "the model's output"))

  # Expanded factors of every leaf axis; occurrences of each class.
  factors = {name: [axes.expand(a) for a in leaf_axes]
             for name, leaf_axes in zip(names, param_axes)}
  occurrences: dict[int, list[tuple[str, int]]] = {}  # class -> (leaf, factor index)
  for name, leaf in factors.items():
    for k, f in enumerate(f for fs in leaf for f in fs):
      occurrences.setdefault(f, []).append((name, k))

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
  first_use = _first_use(closed.jaxpr, len(leaves))
  group_names = {}
  for root, where in sorted(groups.items(), key=lambda kv: _writer(kv[1], names, first_use)):
    leaf, axis = _writer(where, names, first_use)[-2:]
    module = leaf.split("/", 1)[1].rsplit("/", 1)[0]
    last = sum(len(fs) for fs in factors[leaf]) - 1
    name = f"P_{module}" if axis == last else f"P_{module}:{axis}"
    while name in group_names.values():
      name += "'"
    group_names[root] = name

  spec_axes, shapes = {}, {}
  for name, leaf in factors.items():
    # An axis that a reshape factored needs a view only where a group is one of the factors.
    leaf = [fs if any(f in group_names for f in fs) else fs[:1] for fs in leaf]
    if any(len(fs) > 1 for fs in leaf):
      shapes[name] = tuple(axes.size[f] for fs in leaf for f in fs)
      spec_axes[name] = tuple(group_names.get(f) for fs in leaf for f in fs)
    else:
      spec_axes[name] = tuple(group_names.get(fs[0]) if fs else None for fs in leaf)

  sites: dict[str, list[tuple[str, ...]]] = {}
  num_outputs = len(jax.tree.leaves(out_shapes[0]))
  for module, a in zip(layer_paths, outs[num_outputs:]):
    if not a:
      continue
    last = axes.expand(a[-1])
    # A site's other axes must be positions (examples, pixels, tokens), not other units.
    others_fixed = not any(f in group_names for axis in a[:-1] for f in axes.expand(axis))
    if len(last) == 1 and last[0] in group_names and others_fixed:
      sites.setdefault(group_names[last[0]], []).append(module)
  return align.PermutationSpec(spec_axes, {k: tuple(v) for k, v in sites.items()},
                               shapes=shapes)


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
