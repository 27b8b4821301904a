"""mechconn.finite: leaf paths, finiteness flags and the first non-finite leaf."""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mechconn import finite


@flax.struct.dataclass
class _Record:
  weights: jax.Array
  pair: tuple


def _joined_by_hand(path) -> str:
  """The definition: each key's dict key, sequence index or attribute name, '/'-joined."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def test_leaf_path_joins_dict_keys_indices_and_attribute_names():
  tree = {"params": [jnp.ones(2), {"dense": _Record(weights=jnp.zeros(3), pair=(1.0, 2.0))}],
          "step": jnp.zeros(())}
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  kinds = {type(k).__name__ for path, _ in flat for k in path}
  assert kinds == {"DictKey", "SequenceKey", "GetAttrKey"}
  assert [finite.leaf_path(path) for path, _ in flat] == [
      "params/0", "params/1/dense/weights", "params/1/dense/pair/0",
      "params/1/dense/pair/1", "step"]
  assert [finite.leaf_path(path) for path, _ in flat] == [_joined_by_hand(p) for p, _ in flat]
  assert finite.leaf_path(()) == ""


def test_first_nonfinite_leaf_names_the_leaf_by_its_path():
  tree = {"a": [jnp.ones(2), jnp.array([1.0, np.nan])], "b": jnp.arange(3)}
  assert finite.first_nonfinite_leaf(tree) == "a/1"
  assert not bool(finite.all_finite_jit(tree))
  assert finite.first_nonfinite_leaf({"a": jnp.ones(2)}) is None
  assert finite.first_nonfinite_leaf(jnp.array(np.inf)) == "<root>"
