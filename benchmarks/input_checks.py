"""Benchmark: what the input checks cost beside the path evaluation they guard.

Work per run (defaults, as benchmarks/path_eval.py): the linear path between
two random inits of SmallCNN(--width), K = 16 t values; at each t BatchNorm
statistics recomputed from 8 batches of 128 and loss/accuracy over 2,048 eval
examples (batches of 128), 32x32x3 inputs.

Timed, each the median seconds over --repeats rounds after one warm-up
(compile) run, the four in turns within a round:
  static:       the checks that read no data (`input_checks.check_batches`,
                `check_point_dtypes`, `check_outputs`: jax.eval_shape);
  check_inputs: `input_checks.check_inputs`, the one compiled pass over the
                parameters and data (finite, image range, targets, weights)
                with its abstract output check;
  core:         the pure core `barriers.path_metrics` under `jax.jit` (the
                evaluation, unchecked);
  evaluate_path: the checked eager wrapper (all checks, the core, the result
                checks).
Prints one JSON line per measurement with its ratio to the core
(`vs_core`), and a line with the wrapper's overhead over the core.

  python benchmarks/input_checks.py
  python benchmarks/input_checks.py --num_t=4 --eval_examples=512 --repeats=3   # quicker
"""

import argparse
import json
import time

import jax
import numpy as np

from mechconn import barriers, input_checks, objectives
from mechconn.models import get_model


def median_seconds(fns: dict, repeats: int) -> dict[str, float]:
  """{name: median wall time of fn()} over `repeats` rounds after one warm-up (compile) run.

  The functions are timed in turns within each round, so that a change in the machine's
  load (a shared CPU) reaches them all alike.
  """
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--num_t", type=int, default=16)
  parser.add_argument("--eval_examples", type=int, default=2048)
  parser.add_argument("--eval_batch", type=int, default=128)
  parser.add_argument("--bn_batches", type=int, default=8)
  parser.add_argument("--bn_batch", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  image_shape = (32, 32, 3)
  rng = np.random.default_rng(0)
  model = get_model("small_cnn", 10, width=args.width)
  points = tuple(model.init(jax.random.key(k), np.zeros((2,) + image_shape, np.float32))["params"]
                 for k in (0, 1))
  n = args.eval_examples // args.eval_batch
  eval_batches = jax.device_put({
      "image": rng.normal(size=(n, args.eval_batch) + image_shape).astype(np.float32),
      "label": rng.integers(0, 10, (n, args.eval_batch)).astype(np.int32),
      "mask": np.ones((n, args.eval_batch), np.float32)})
  bn_batches = jax.device_put({"image": rng.normal(
      size=(args.bn_batches, args.bn_batch) + image_shape).astype(np.float32)})
  ts = np.linspace(0, 1, args.num_t)
  objective = objectives.CLASSIFICATION
  named_points = {f"path point {i}": p for i, p in enumerate(points)}

  def static():
    input_checks.check_batches(eval_batches, "eval set 'eval'", objective)
    input_checks.check_batches(bn_batches, "bn_batches", objective, weighted=False)
    input_checks.check_point_dtypes(points, "benchmark")
    return input_checks.check_outputs(model.apply, points[0], eval_batches, objective)

  def check_inputs():
    input_checks.check_inputs(model.apply, named_points, {"eval": eval_batches}, bn_batches,
                              objective)
    return 0

  core_jit = jax.jit(lambda pts, ev, bn: barriers.path_metrics(
      model.apply, pts, ts, {"eval": ev}, bn)["eval"].loss)

  def core():
    return core_jit(points, eval_batches, bn_batches)

  def evaluate_path():
    return barriers.evaluate_path(model.apply, points, ts, eval_batches,
                                  bn_batches=bn_batches).loss

  fns = {"static": static, "check_inputs": check_inputs, "core": core,
         "evaluate_path": evaluate_path}
  seconds = median_seconds(fns, args.repeats)
  common = {"benchmark": "input_checks", "model": f"small_cnn(width={args.width})",
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "num_t": args.num_t, "eval_examples": n * args.eval_batch,
            "bn_examples": args.bn_batches * args.bn_batch, "repeats": args.repeats}
  for name, s in seconds.items():
    print(json.dumps({**common, "measure": name, "median_s": round(s, 5),
                      "vs_core": round(s / seconds["core"], 4)}), flush=True)
  print(json.dumps({**common, "measure": "wrapper_overhead",
                    "median_s": round(seconds["evaluate_path"] - seconds["core"], 5),
                    "vs_core": round(seconds["evaluate_path"] / seconds["core"] - 1, 4)}),
        flush=True)


if __name__ == "__main__":
  main()
