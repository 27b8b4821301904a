"""mechconn.mesh on the one local device (8-device runs: test_train_resume.py)."""

import jax
import numpy as np
import pytest

from mechconn import mesh as mesh_lib


def test_one_device_mesh_shards_and_replicates():
  mesh = mesh_lib.data_mesh()
  assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count()
  batch = {"image": np.arange(24.0).reshape(4, 2, 3), "label": np.arange(4)}
  sharded = mesh_lib.shard_batch(batch, mesh)
  np.testing.assert_array_equal(sharded["image"], batch["image"])
  assert sharded["image"].sharding == mesh_lib.batch_sharding(mesh)
  stacked = mesh_lib.shard_batch({"x": np.zeros((3, 4))}, mesh, batch_axis=1)
  assert stacked["x"].sharding.spec == jax.sharding.PartitionSpec(None, "data")
  tree = mesh_lib.replicate({"w": np.ones(3)}, mesh)
  assert tree["w"].sharding.is_fully_replicated
  abstract = mesh_lib.abstract_like({"w": np.ones((2, 3), np.float32)}, mesh_lib.replicated(mesh))
  assert abstract["w"].shape == (2, 3) and abstract["w"].sharding.is_fully_replicated


def test_process_rows_and_batch_size_check():
  assert mesh_lib.process_rows(32) == slice(0, 32)  # one process loads every row
  mesh_lib.check_batch_size(64, 8)
  with pytest.raises(ValueError, match=r"batch_size=60 is not divisible by the 8 devices"):
    mesh_lib.check_batch_size(60, 8)
