"""Classes of array axes that must carry the same permutation: a union-find over factors.

Every axis of every array in a traced program is a list of *factors* (outer
to inner; an axis of size 1 has none). `unify` says two axes carry the same
permutation factor by factor; a factor larger than its counterpart is refined
into sub-factors (every axis of its class follows), which is how a flatten or
a split into attention heads keeps a permutation on its own factor. `fix`
records why a class may not be permuted (a `Constraint`).
"""

from collections.abc import Sequence
import dataclasses


@dataclasses.dataclass(frozen=True)
class Constraint:
  """Why a class of axes may not be permuted."""
  positional: bool  # True: a correct constraint (input, window, slice, ...); False: unsupported
  text: str


class AxisClasses:
  """Union-find over axis factors, with refinement of a class into sub-factors."""

  def __init__(self):
    self.size: list[int] = []
    self.parent: list[int] = []
    self.parts: dict[int, list[int]] = {}  # root -> its sub-factors (outer to inner)
    self.events: dict[int, list[Constraint]] = {}

  def new(self, size: int, event: Constraint | None = None) -> list[int]:
    """A fresh axis of `size` as its factor list ([] for size 1)."""
    if size == 1:
      return []
    node = len(self.size)
    self.size.append(size)
    self.parent.append(node)
    self.events[node] = [event] if event else []
    return [node]

  def find(self, node: int) -> int:
    while self.parent[node] != node:
      self.parent[node] = self.parent[self.parent[node]]
      node = self.parent[node]
    return node

  def expand(self, factors: Sequence[int]) -> list[int]:
    """The factors as current atomic class roots (refinements applied)."""
    out = []
    for node in factors:
      root = self.find(node)
      out.extend(self.expand(self.parts[root]) if root in self.parts else [root])
    return out

  def fix(self, factors: Sequence[int], event: Constraint) -> None:
    for root in self.expand(factors):
      self.events[root].append(event)

  def split(self, root: int, first: int) -> list[int]:
    """Refines `root` into [first, size / first]; every axis of its class follows."""
    parts = [self.new(first)[0], self.new(self.size[root] // first)[0]]
    for p in parts:
      self.events[p] = list(self.events[root])
    self.parts[root] = parts
    return parts

  def _union(self, a: int, b: int) -> None:
    a, b = self.find(a), self.find(b)
    if a != b:
      self.parent[b] = a
      self.events[a] = self.events[a] + self.events.pop(b)

  def unify(self, a: Sequence[int], b: Sequence[int], event: Constraint) -> None:
    """The two factorisations of one axis carry the same permutation, factor by factor.

    A factor larger than its counterpart is refined when the sizes divide;
    factors whose boundaries cannot be aligned are fixed with `event`.
    """
    a, b = self.expand(a), self.expand(b)
    while a and b:
      x, y = a[0], b[0]
      sx, sy = self.size[x], self.size[y]
      if sx == sy:
        self._union(x, y)
        a, b = self.expand(a[1:]), self.expand(b[1:])
      elif sx > sy and sx % sy == 0:
        a = self.split(x, sy) + a[1:]
      elif sy > sx and sy % sx == 0:
        b = self.split(y, sx) + b[1:]
      else:  # e.g. [2, 3] against [3, 2]: no common refinement
        self.fix(a + b, event)
        return
    if a or b:
      raise AssertionError(f"unify of axes of different sizes: {a} {b}")
