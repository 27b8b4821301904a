"""Dry runs: build a job's model, optimiser, mesh and shardings, run one step, estimate the run.

A dry run reads no data (batches are zeros of the dataset's image shape) and
writes nothing: it checks that a config builds and compiles on the devices at
hand, and prints the mesh, how state and batches are placed, the per-device
batch, and an estimate of the full run's time from one timed step:

  estimate = steps x (seconds per timed step) x (global batch / timed batch).

On accelerators the timed step uses the config's global batch; on CPU a tiny
one (`CPU_EXAMPLES_PER_DEVICE` per device), so that a paper preset's dry run
takes seconds there, and the estimate scales it linearly (a rough CPU figure).
The estimate covers training steps only (no evaluation or checkpoints).
"""

from collections.abc import Callable
import dataclasses
import json
import time
from typing import Any

import jax
import numpy as np

from mechconn import mesh as mesh_lib
from mechconn.data import datasets

CPU_EXAMPLES_PER_DEVICE = 2
TRAIN_SIZES = {"shapes10": datasets.EMBEDDED_SIZES["train"],
               "glyphs10": datasets.EMBEDDED_SIZES["train"], "cifar10": 50_000,
               "cifar100": 50_000, "fashion_mnist": 60_000, "mnist": 60_000}


def image_shape(data: Any) -> tuple[int, int, int]:
  """[H, W, C] of a data config's training images (Dominoes stack two 32x32 halves)."""
  return (64, 32, 3) if data.cue == "dominoes" else (32, 32, 3)


def num_train_examples(data: Any) -> int:
  """Training examples of a data config without loading it."""
  if data.dataset not in TRAIN_SIZES:
    raise ValueError(f"Unknown dataset {data.dataset!r}; valid: {sorted(TRAIN_SIZES)}.")
  full = TRAIN_SIZES[data.dataset]
  return full if data.num_train == -1 else min(data.num_train, full)


def timed_batch_size(global_batch: int, num_devices: int, backend: str) -> int:
  """The global batch of the timed step: the real one, or a tiny one on CPU."""
  if backend == "cpu":
    return min(global_batch, CPU_EXAMPLES_PER_DEVICE * num_devices)
  return global_batch


def zero_batch(data: Any, batch_size: int, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """{'image', 'label'} of zeros, sharded over the mesh like a real batch."""
  local = {"image": np.zeros((batch_size, *image_shape(data)), np.float32),
           "label": np.zeros((batch_size,), np.int32)}
  rows = mesh_lib.process_rows(batch_size)
  return mesh_lib.shard_batch({k: v[rows] for k, v in local.items()}, mesh)


def describe_placement(tree: Any) -> dict[str, str]:
  """{leaf path: 'shape dtype spec'} of jax.Arrays (spec 'replicated' or the PartitionSpec)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    sharding = leaf.sharding
    spec = ("replicated" if sharding.is_fully_replicated
            else str(getattr(sharding, "spec", sharding)))
    out[jax.tree_util.keystr(path)] = f"{list(leaf.shape)} {leaf.dtype} {spec}"
  return out


def summarize_placement(tree: Any) -> str:
  """'N leaves (M parameters): K replicated, J sharded' for a pytree of jax.Arrays."""
  leaves = jax.tree.leaves(tree)
  replicated = sum(leaf.sharding.is_fully_replicated for leaf in leaves)
  size = sum(int(np.prod(leaf.shape)) for leaf in leaves)
  return (f"{len(leaves)} arrays ({size:,} values): {replicated} replicated, "
          f"{len(leaves) - replicated} sharded")


@dataclasses.dataclass
class StepTiming:
  """One step's compile time and steady-state time, and the batch it ran at."""

  name: str
  compile_seconds: float
  step_seconds: float
  timed_batch: int
  global_batch: int
  num_steps: int

  @property
  def estimate_seconds(self) -> float:
    return self.num_steps * self.step_seconds * self.global_batch / self.timed_batch


def time_step(name: str, step: Callable[[Any, Any], tuple[Any, Any]], state: Any, batch: Any, *,
              global_batch: int, num_steps: int) -> tuple[Any, StepTiming]:
  """Runs `step` twice (compile, then steady state) and times both; returns the new state."""
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  timed_batch = int(jax.tree.leaves(batch)[0].shape[0])
  return state, StepTiming(name, compile_seconds, time.perf_counter() - start, timed_batch,
                           global_batch, num_steps)


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
                 "timed_per_device_batch": t.timed_batch // len(devices),
                 "estimate_seconds": round(t.estimate_seconds, 1)} for t in timings],
      "estimate_seconds": round(sum(t.estimate_seconds for t in timings), 1),
  }
  lines = [f"dry run: {title}",
           f"  backend {record['backend']}, mesh {record['mesh']}, {record['devices']}"]
  lines += [f"  {name}: {text}" for name, text in record["placement"].items()]
  for t in record["steps"]:
    lines.append(
        f"  {t['name']}: global batch {t['global_batch']} = {t['per_device_batch']} per device; "
        f"timed at {t['timed_batch']} ({t['timed_per_device_batch']} per device): compile "
        f"{t['compile_seconds']:.1f} s, step {t['step_seconds']:.3f} s; {t['num_steps']:,} "
        f"steps -> {_hours(t['estimate_seconds'])}")
  lines.append(f"  estimate for the whole run (training steps only): "
               f"{_hours(record['estimate_seconds'])}")
  print("\n".join(lines))
  if jax.process_index() == 0:
    print("DRY_RUN " + json.dumps(record))
  return record


def _hours(seconds: float) -> str:
  return f"{seconds:,.0f} s ({seconds / 3600:.2f} h)"

