"""Runs path evaluation on every device of this process and on one device; prints JSON.

Started by test_sharded_path.py with XLA_FLAGS=--xla_force_host_platform_device_count=8
(the flag must be set before jax starts, hence a separate process).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from mechconn import barriers
from mechconn import counterfactual
from mechconn import mesh as mesh_lib
from mechconn.data import datasets, views
from mechconn.models import get_model


def main():
  x, y = datasets.load_base("shapes10", "test", num_examples=60)
  test_views = views.box_views(datasets.normalize(x), y, 10, seed=0)
  model = get_model("small_cnn", 10, width=4)  # has BatchNorm
  a, b = (model.init(jax.random.key(k), jnp.zeros((1, 32, 32, 3)))["params"] for k in (0, 1))
  batches = counterfactual.stack_views(test_views, y, batch_size=16)  # 4 batches, last padded
  bn = {"image": datasets.normalize(x[:32]).reshape(2, 16, 32, 32, 3)}
  everywhere, one = mesh_lib.data_mesh(), mesh_lib.data_mesh(jax.devices()[:1])
  # As a multi-host task passes them: global arrays sharded over examples.
  sharded_views = {v: mesh_lib.shard_batch(dict(bt), everywhere, batch_axis=1)
                   for v, bt in batches.items()}
  out = {"num_devices": jax.device_count()}
  for num_t in (16, 11, 3):
    ts = np.linspace(0, 1, num_t)
    runs = {
        "single": barriers.evaluate_path_on_sets(model.apply, (a, b), ts, batches, bn_batches=bn,
                                                 mesh=one),
        "mesh": barriers.evaluate_path_on_sets(model.apply, (a, b), ts, batches, bn_batches=bn,
                                               mesh=everywhere),
        "mesh_global_arrays": barriers.evaluate_path_on_sets(
            model.apply, (a, b), ts, sharded_views, bn_batches=bn, mesh=everywhere),
        "mesh_chunked": barriers.evaluate_path_on_sets(
            model.apply, (a, b), ts, batches, bn_batches=bn, mesh=everywhere,
            strategy="chunked")}
    out[str(num_t)] = {
        name: {v: {"loss": np.asarray(r.loss).tolist(), "accuracy": np.asarray(r.accuracy).tolist(),
                   "sharded_over": r.sharded_over, "num_devices": r.num_devices}
               for v, r in result.items()}
        for name, result in runs.items()}
  # A path without BatchNorm statistics data: an MLP, through evaluate_path.
  mlp = get_model("mlp", 10, hidden=(8,))
  pa, pb = (mlp.init(jax.random.key(k), jnp.zeros((1, 32, 32, 3)))["params"] for k in (2, 3))
  ts = np.linspace(0, 1, 9)
  out["mlp"] = {name: np.asarray(barriers.evaluate_path(mlp.apply, (pa, pb), ts, batches["clean"],
                                                        mesh=m).loss).tolist()
                for name, m in (("single", None), ("mesh", everywhere))}
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
