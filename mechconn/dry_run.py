"""Dry runs: time a job's step on zero batches and estimate the run (knows no task).

A task's dry run (`mechconn.tasks`) builds what its run builds, with the same
builder, then times its step here: it reads no data (batches are zeros of the
dataset's image shape) and writes nothing, so it checks that a config builds
and compiles on the devices at hand, and prints the mesh, how state and
batches are placed, the per-device batch, and an estimate of the full run's
time from one timed step:

  estimate = steps x (seconds per step at the global batch).

On accelerators the timed step uses the config's global batch. On CPU, so that
a paper preset's dry run takes seconds, steps are timed at two tiny batches
(`CPU_EXAMPLES_PER_DEVICE` per device) and the time per step at the global
batch is extrapolated from the straight line through them (a fixed cost per
step plus a cost per example): a rough CPU figure (tiny-batch timings on a
shared CPU are noisy: repeat dry runs of one preset differed by up to 1.5x
here). Each timing is the faster of the third and fourth calls at its batch
(the first compiles, the second settles the state's placement). The estimate
covers the timed kinds of step only (no evaluation or checkpoints).
"""

from collections.abc import Callable
import dataclasses
import json
import time
from typing import Any

import jax
import numpy as np

from mechconn import mesh as mesh_lib

CPU_EXAMPLES_PER_DEVICE = (2, 8)


def timed_batch_sizes(global_batch: int, num_devices: int, backend: str) -> tuple[int, ...]:
  """The global batches of the timed steps: the real one, or two tiny ones on CPU."""
  if backend == "cpu":
    return tuple(sorted({min(global_batch, n * num_devices) for n in CPU_EXAMPLES_PER_DEVICE}))
  return (global_batch,)


def zero_batch(image_shape: tuple[int, ...], batch_size: int, mesh: jax.sharding.Mesh
               ) -> dict[str, jax.Array]:
  """{'image', 'label'} of zeros, sharded over the mesh like a real batch."""
  local = {"image": np.zeros((batch_size, *image_shape), np.float32),
           "label": np.zeros((batch_size,), np.int32)}
  rows = mesh_lib.process_rows(batch_size)
  return mesh_lib.shard_batch({k: v[rows] for k, v in local.items()}, mesh)


def _spec(leaf: jax.Array) -> str:
  sharding = leaf.sharding
  if hasattr(sharding, "spec"):
    return "replicated" if sharding.spec == jax.sharding.PartitionSpec() else str(sharding.spec)
  return "replicated" if sharding.is_fully_replicated else str(sharding)


def summarize_placement(tree: Any) -> str:
  """'N arrays (M values): K x <spec>, ...' for a pytree of jax.Arrays: how it is sharded."""
  leaves = jax.tree.leaves(tree)
  specs = [_spec(leaf) for leaf in leaves]
  size = sum(int(np.prod(leaf.shape)) for leaf in leaves)
  counts = ", ".join(f"{specs.count(spec)} x {spec}" for spec in sorted(set(specs)))
  return f"{len(leaves)} arrays ({size:,} values): {counts}"


@dataclasses.dataclass
class StepTiming:
  """Steady-state step times at one or two batch sizes; the estimate at the global batch."""

  name: str
  compile_seconds: float
  timed_batches: tuple[int, ...]
  step_seconds: tuple[float, ...]
  global_batch: int
  num_steps: int

  @property
  def seconds_per_step(self) -> float:
    """At the global batch: proportional to one timing, or on the line through two."""
    if len(self.timed_batches) == 1:
      return self.step_seconds[0] * self.global_batch / self.timed_batches[0]
    (n1, n2), (t1, t2) = self.timed_batches, self.step_seconds
    per_example = max((t2 - t1) / (n2 - n1), 0.0)
    return t1 + per_example * (self.global_batch - n1)

  @property
  def estimate_seconds(self) -> float:
    return self.num_steps * self.seconds_per_step


def time_step(name: str, step: Callable[[Any, Any], tuple[Any, Any]], state: Any,
              make_batch: Callable[[int], Any], *, global_batch: int, num_steps: int,
              timed_batches: tuple[int, ...]) -> tuple[Any, StepTiming]:
  """Times `step` at each of `timed_batches` (make_batch(n): a batch of n); the new state."""
  compile_seconds, step_seconds = 0.0, []
  for n in timed_batches:
    batch = make_batch(n)
    times = []
    for call in range(4):  # compile, settle the state's placement, then the faster of two
      start = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    compile_seconds += times[0]
    step_seconds.append(min(times[2:]))
  return state, StepTiming(name, compile_seconds, tuple(timed_batches), tuple(step_seconds),
                           global_batch, num_steps)


def time_on_zero_batches(name: str, step: Callable[[Any, Any], tuple[Any, Any]], state: Any,
                         image_shape: tuple[int, ...], mesh: jax.sharding.Mesh, *,
                         global_batch: int,
                         num_steps: int, to_batch: Callable[[dict], Any] = lambda b: b
                         ) -> tuple[Any, StepTiming, Any]:
  """`time_step` on zero batches of `image_shape` images (mapped by `to_batch`), timed sizes.

  Returns (state, timing, the last batch).
  """
  made = []

  def make_batch(n):
    made.append(to_batch(zero_batch(image_shape, n, mesh)))
    return made[-1]

  state, timing = time_step(name, step, state, make_batch, global_batch=global_batch,
                            num_steps=num_steps,
                            timed_batches=timed_batch_sizes(global_batch, mesh.devices.size,
                                                            jax.default_backend()))
  return state, timing, made[-1]


def report(title: str, mesh: jax.sharding.Mesh, placements: dict[str, Any],
           timings: list[StepTiming]) -> dict:
  """Prints the dry-run report and returns it as a dict (JSON-ready)."""
  devices = mesh.devices.flatten()
  record = {
      "dry_run": title,
      "backend": jax.default_backend(),
      "mesh": {name: int(size) for name, size in mesh.shape.items()},
      "devices": f"{len(devices)} x {devices[0].device_kind} over {jax.process_count()} "
                 "process(es)",
      "placement": {name: summarize_placement(tree) for name, tree in placements.items()},
      "steps": [{**dataclasses.asdict(t),
                 "per_device_batch": t.global_batch // len(devices),
                 "seconds_per_step": round(t.seconds_per_step, 4),
                 "estimate_seconds": round(t.estimate_seconds, 1)} for t in timings],
      "estimate_seconds": round(sum(t.estimate_seconds for t in timings), 1),
  }
  record = json.loads(json.dumps(record))  # tuples -> lists: the record as it is printed
  lines = [f"dry run: {title}",
           f"  backend {record['backend']}, mesh {record['mesh']}, {record['devices']}"]
  lines += [f"  {name}: {text}" for name, text in record["placement"].items()]
  for t in record["steps"]:
    timed = ", ".join(f"{s:.3f} s at {n}" for n, s in zip(t["timed_batches"],
                                                             t["step_seconds"]))
    lines.append(
        f"  {t['name']}: global batch {t['global_batch']} = {t['per_device_batch']} per device; "
        f"compile {t['compile_seconds']:.1f} s; timed {timed} -> {t['seconds_per_step']:.3f} s "
        f"per step at {t['global_batch']}; {t['num_steps']:,} steps -> "
        f"{_hours(t['estimate_seconds'])}")
  lines.append(f"  estimate for the whole run (the steps above; no evaluation or checkpoints): "
               f"{_hours(record['estimate_seconds'])}")
  print("\n".join(lines))
  if jax.process_index() == 0:
    print("DRY_RUN " + json.dumps(record))
  return record


def _hours(seconds: float) -> str:
  return f"{seconds:,.0f} s ({seconds / 3600:.2f} h)"

