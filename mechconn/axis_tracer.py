"""Following every axis of every array through a jaxpr: the rules behind `symmetry.derive_spec`.

`AxisTracer.run` walks a jaxpr's equations and, per primitive, merges the axes
that must carry one permutation (`AxisClasses.unify`), refines an axis a
reshape splits or merges, and fixes an axis whose positions the operation
reads (`AxisClasses.fix`, with a `Constraint` saying why). A primitive with
no rule here fixes every axis it touches (a non-positional constraint, which
`derive_spec` reports if it decides a group). The rules are a table, `RULES`:
primitive name -> rule; a call primitive (`CALLS`) is followed into its body.
"""

import dataclasses

from jax.extend import core as jax_core
import numpy as np

from mechconn.axis_classes import AxisClasses, Constraint

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
class AxisTracer:
  """The axis classes of a traced program, built equation by equation."""

  axes: AxisClasses = dataclasses.field(default_factory=AxisClasses)
  # Axes a matrix product or convolution contracts: units the computation reads.
  contracted: list[list[int]] = dataclasses.field(default_factory=list)

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
    """The axes of `eqn`'s outputs, from its inputs' axes `ins`, by its primitive's rule."""
    name, p = eqn.primitive.name, eqn.params
    if CALLS.get(name) and CALLS[name] in p:
      body = p[CALLS[name]]
      inner, consts = (body.jaxpr, body.consts) if hasattr(body, "jaxpr") else (body, ())
      n = len(ins) - len(inner.invars)
      return self.run(inner, consts, ins[n:], where)
    rule = RULES.get(name, AxisTracer._no_rule)
    return rule(self, eqn, ins, f"'{name}' in {where}")

  # --- One rule per primitive (`RULES`): rule(self, eqn, ins, here) -> output axes. ----

  def _elementwise(self, eqn, ins, here):
    out_shape = _out_shapes(eqn)[0]
    out = self.fresh(out_shape)
    for a, s in zip(ins, _in_shapes(eqn)):
      if len(s) == len(out_shape):
        for i, (si, so) in enumerate(zip(s, out_shape)):
          if si == so:
            self.axes.unify(a[i], out[i], Constraint(False, here))
    return [out]

  def _identity(self, eqn, ins, here):
    return list(ins)

  def _symmetric_reduction(self, eqn, ins, here):
    return [[a for i, a in enumerate(ins[0]) if i not in eqn.params["axes"]]]

  def _arg_reduction(self, eqn, ins, here):
    for i in eqn.params["axes"]:
      self.axes.fix(ins[0][i], Constraint(True, here))
    return self._symmetric_reduction(eqn, ins, here)

  def _cumulative(self, eqn, ins, here):
    self.axes.fix(ins[0][eqn.params["axis"]], Constraint(True, here))
    return [list(ins[0])]

  def _broadcast_in_dim(self, eqn, ins, here):
    p = eqn.params
    out = self.fresh(p["shape"])
    for i, d in enumerate(p["broadcast_dimensions"]):
      if _in_shapes(eqn)[0][i] == p["shape"][d]:
        out[d] = ins[0][i]
    return [out]

  def _transpose(self, eqn, ins, here):
    return [[ins[0][i] for i in eqn.params["permutation"]]]

  def _squeeze(self, eqn, ins, here):
    return [[a for i, a in enumerate(ins[0]) if i not in eqn.params["dimensions"]]]

  def _reshape(self, eqn, ins, here):
    if eqn.params.get("dimensions") is not None:
      return self._no_rule(eqn, ins, here)
    return [self.reshape(ins[0], _out_shapes(eqn)[0], Constraint(False, here))]

  def _dot_general(self, eqn, ins, here):
    return [self.dot_general(ins, _in_shapes(eqn), eqn.params["dimension_numbers"], here)]

  def _conv(self, eqn, ins, here):
    return [self.conv(ins, _out_shapes(eqn)[0], eqn.params, here)]

  def _window(self, eqn, ins, here):
    return [self.window(ins[0], _out_shapes(eqn)[0], eqn.params, here)]

  def _positional(self, eqn, ins, here):
    return [self.positional(ins[0], _in_shapes(eqn)[0], _out_shapes(eqn)[0],
                            eqn.primitive.name, eqn.params, here)]

  def _concatenate(self, eqn, ins, here):
    return [self.concatenate(ins, _out_shapes(eqn)[0], eqn.params["dimension"], here)]

  def _iota(self, eqn, ins, here):
    out = self.fresh(_out_shapes(eqn)[0])
    self.axes.fix(out[eqn.params["dimension"]], Constraint(True, here))
    return [out]

  def _no_rule(self, eqn, ins, here):
    """Nothing is known about how it treats positions: every axis it touches is fixed."""
    event = Constraint(False, f"{here} (no rule for this operation)")
    for a in ins:
      for axis in a:
        self.axes.fix(axis, event)
    return [self.fresh(s, event) for s in _out_shapes(eqn)]

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
      self.contracted.append(lhs[i])
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
    self.contracted.append(lhs[dn.lhs_spec[1]])
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
      block_axis = self.axes.new(len(ins), Constraint(True, here)) + blocks[0]
      return out[:dim] + [block_axis] + out[dim + 1:]
    for b in blocks:
      self.axes.fix(b, Constraint(False, f"{here} (joins different axes along one axis)"))
    self.axes.fix(out[dim], Constraint(True, here))
    return out


def _in_shapes(eqn) -> list[tuple[int, ...]]:
  return [tuple(v.aval.shape) for v in eqn.invars]


def _out_shapes(eqn) -> list[tuple[int, ...]]:
  return [tuple(v.aval.shape) for v in eqn.outvars]


# primitive name -> rule; a primitive not here fixes every axis it touches (`_no_rule`).
RULES = {
    **dict.fromkeys(ELEMENTWISE, AxisTracer._elementwise),
    **dict.fromkeys(IDENTITIES, AxisTracer._identity),
    **dict.fromkeys(SYMMETRIC_REDUCTIONS, AxisTracer._symmetric_reduction),
    **dict.fromkeys(("argmax", "argmin"), AxisTracer._arg_reduction),
    **dict.fromkeys(("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"),
                    AxisTracer._cumulative),
    "broadcast_in_dim": AxisTracer._broadcast_in_dim,
    "transpose": AxisTracer._transpose,
    "squeeze": AxisTracer._squeeze,
    "reshape": AxisTracer._reshape,
    "dot_general": AxisTracer._dot_general,
    "conv_general_dilated": AxisTracer._conv,
    **dict.fromkeys(("reduce_window_sum", "reduce_window_max", "reduce_window_min"),
                    AxisTracer._window),
    **dict.fromkeys(("slice", "dynamic_slice", "pad", "rev"), AxisTracer._positional),
    "concatenate": AxisTracer._concatenate,
    "iota": AxisTracer._iota,
}
