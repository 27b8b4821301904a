"""mechconn.trees: Flax variables from their parts, stacking trees."""

import jax.numpy as jnp
import numpy as np

from mechconn import trees


def test_variables_of_holds_batch_stats_only_when_there_are_statistics():
  params = {"dense": {"kernel": jnp.ones((2, 3))}}
  stats = {"bn": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
  assert trees.variables_of(params, stats) == {"params": params, "batch_stats": stats}
  for none in ({}, None, {"bn": {}}):
    assert trees.variables_of(params, none) == {"params": params}
  assert trees.variables_of(params) == {"params": params}


def test_stack_gives_every_leaf_a_leading_axis_in_order():
  steps = [{"loss": jnp.asarray(float(i)), "grad": {"w": jnp.full((2,), i)}} for i in range(3)]
  stacked = trees.stack(steps)
  np.testing.assert_array_equal(stacked["loss"], [0.0, 1.0, 2.0])
  np.testing.assert_array_equal(stacked["grad"]["w"], [[0, 0], [1, 1], [2, 2]])
  assert trees.stack([{"a": jnp.ones((4, 5))}])["a"].shape == (1, 4, 5)
