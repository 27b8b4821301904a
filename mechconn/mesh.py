"""Data parallelism with `jax.sharding`: one mesh, a 'data' axis, replicated state.

Every job runs the same code on a `Mesh` over all devices (`jax.devices()`:
every host's devices after `jax.distributed.initialize()`); one device is a
mesh of size one. Batches are sharded along their leading axis over 'data';
parameters and optimiser state are replicated; `jax.jit` inserts the
cross-device reductions (the mean loss, BatchNorm's batch moments), so a step
on 8 devices computes what it computes on 1, up to float summation order.

On several hosts each process loads only its rows of every global batch
(`process_rows`) and `shard_batch` assembles the global array from them.
"""

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


def data_mesh(devices: list | None = None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Shards axis `batch_axis` over 'data' (1 for stacked [num_batches, B, ...])."""
  return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def check_batch_size(batch_size: int, num_devices: int, name: str = "batch_size") -> None:
  """Raises ValueError unless a global batch splits evenly over `num_devices`."""
  if batch_size % num_devices:
    raise ValueError(f"{name}={batch_size} is not divisible by the {num_devices} devices; "
                     f"use a multiple of {num_devices}.")


def process_rows(batch_size: int) -> slice:
  """The rows of a global batch that this process loads (all of them on one host)."""
  per_process = batch_size // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def put(tree, sharding: jax.sharding.Sharding):
  """Places a pytree (the same global values on every host) with `sharding`.

  With several processes `jax.device_put` refuses devices other processes own,
  so each process builds its shards of the global array from its own (equal)
  copy; typed PRNG keys travel as their key data. Arrays already placed with
  `sharding` are left as they are.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put_leaf(x):
    if isinstance(x, jax.Array):
      if x.sharding == sharding:
        return x
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put_leaf(jax.random.key_data(x)),
                                        impl=jax.random.key_impl(x))
      if not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # a global array: resharded by XLA
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put_leaf, tree)


def replicate(tree, mesh: Mesh):
  """Places a pytree (same values on every host) on every device of the mesh."""
  return put(tree, replicated(mesh))


def replicate_beside(tree, array):
  """`tree` replicated over the mesh `array` is sharded on (unchanged if it has none).

  Parameters made on one device (a head fitted on the host, say) and batches
  sharded over a mesh cannot meet in one program when the mesh spans several
  processes; this puts the parameters where the batches are.
  """
  sharding = getattr(array, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return tree
  return replicate(tree, sharding.mesh)


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, batch_axis: int = 0
                ) -> dict[str, jax.Array]:
  """Global arrays sharded over 'data' from this process's rows of a batch.

  Args:
    local_batch: numpy arrays holding this process's rows (`process_rows`) of
      axis `batch_axis`; on one host, the whole batch.
    mesh: the data mesh.
    batch_axis: the axis split over devices.
  """
  sharding = batch_sharding(mesh, batch_axis)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def abstract_like(tree, sharding: NamedSharding):
  """`jax.ShapeDtypeStruct`s of a pytree with `sharding` attached (restore targets)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
