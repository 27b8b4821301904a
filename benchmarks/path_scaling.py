"""Benchmark: path evaluation time and memory against the number of t, and against devices.

Part 1 (--part=grid): for K in --ks (default 16, 64, 256) and each strategy,
one fresh process evaluates a linear path of SmallCNN(--width) with BatchNorm
recomputed at every t; it reports the median seconds over --repeats runs after
a compile run, XLA's compiled working memory (`barriers.compiled_memory`,
'temp' bytes) and the process's peak resident memory (ru_maxrss, which also
counts the JAX runtime and the data). Ratios are against K = 16 of the same
strategy in the same invocation: 'map' and 'chunked' should stay near 1 in
memory while time grows with K; 'vmap' grows in both (run for K <= --vmap_max_k).

Part 2 (--part=devices): the same evaluation on 1, 2, 4, 8 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=D; each a fresh process),
with K = 16 (spread over t) and K = 4 (spread over the data when D > 4). Fake
devices share this machine's cores, so the times show overhead, not speed-up;
the point is the layout and that the numbers match one device
(max_abs_diff_vs_1_device).

  python benchmarks/path_scaling.py                 # both parts
  python benchmarks/path_scaling.py --part=grid --ks=16,64
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def worker(args):
  import jax
  import jax.numpy as jnp

  from mechconn import barriers
  from mechconn import mesh as mesh_lib
  from mechconn.data import batching, datasets
  from mechconn.models import get_model

  x, y = datasets.load_base("shapes10", "test", num_examples=args.eval_examples + args.bn_examples)
  x = datasets.normalize(x)
  model = get_model("small_cnn", 10, width=args.width)
  a, b = (model.init(jax.random.key(k), jnp.zeros((1, 32, 32, 3)))["params"] for k in (0, 1))
  eval_sets = {"eval": batching.stack_batches(x[:args.eval_examples], y[:args.eval_examples],
                                              args.batch)}
  bn = {"image": batching.stack_batches(x[args.eval_examples:], y[args.eval_examples:],
                                        args.batch, drop_remainder=True)["image"]}
  ts = np.linspace(0, 1, args.k)
  mesh = mesh_lib.data_mesh() if jax.device_count() > 1 else None
  kwargs = dict(bn_batches=bn, strategy=args.strategy, mesh=mesh)
  memory = barriers.compiled_memory(model.apply, (a, b), ts, eval_sets, **kwargs)

  def run():
    out = barriers.evaluate_path_on_sets(model.apply, (a, b), ts, eval_sets, **kwargs)["eval"]
    return jax.block_until_ready(out)

  start = time.perf_counter()
  result = run()
  first = time.perf_counter() - start
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  print("RESULT " + json.dumps({
      "k": args.k, "strategy": args.strategy, "devices": jax.device_count(),
      "sharded_over": result.sharded_over, "first_call_s": round(first, 3),
      "median_s": round(float(np.median(times)), 4),
      "xla_temp_mb": round(memory["temp"] / 2**20, 2),
      "xla_total_mb": round(memory["total"] / 2**20, 2),
      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      "loss": np.asarray(result.loss).tolist()}), flush=True)


def spawn(args, k, strategy, devices=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--k={k}",
         f"--strategy={strategy}", f"--width={args.width}", f"--batch={args.batch}",
         f"--eval_examples={args.eval_examples}", f"--bn_examples={args.bn_examples}",
         f"--repeats={args.repeats}"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if proc.returncode:
    raise RuntimeError(f"worker {cmd} failed:\n{proc.stderr[-3000:]}")
  return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


def grid_part(args):
  for strategy in args.strategies.split(","):
    base = None
    for k in (int(k) for k in args.ks.split(",")):
      if strategy == "vmap" and k > args.vmap_max_k:
        continue
      r = spawn(args, k, strategy)
      base = base or r
      r.pop("loss")
      print(json.dumps({"benchmark": "path_scaling_k", "model": f"small_cnn(width={args.width})",
                        "eval_examples": args.eval_examples, "bn_examples": args.bn_examples,
                        **r, "s_per_t": round(r["median_s"] / k, 4),
                        "time_vs_k16": round(r["median_s"] / base["median_s"], 2),
                        "xla_temp_vs_k16": round(r["xla_temp_mb"] / base["xla_temp_mb"], 3),
                        "peak_rss_vs_k16": round(r["peak_rss_mb"] / base["peak_rss_mb"], 3)}),
            flush=True)


def devices_part(args):
  for k in (16, 4):
    reference = None
    for devices in (1, 2, 4, 8):
      r = spawn(args, k, "map", devices)
      loss = np.asarray(r.pop("loss"))
      reference = reference or (r["median_s"], loss)
      print(json.dumps({"benchmark": "path_scaling_devices", "fake_cpu_devices": True, **r,
                        "time_vs_1_device": round(r["median_s"] / reference[0], 2),
                        "max_abs_diff_vs_1_device": float(np.max(np.abs(loss - reference[1])))}),
            flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--part", default="grid,devices")
  parser.add_argument("--ks", default="16,64,256")
  parser.add_argument("--strategies", default="map,chunked,vmap")
  parser.add_argument("--vmap_max_k", type=int, default=64)
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--eval_examples", type=int, default=256)
  parser.add_argument("--bn_examples", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--worker", action="store_true")
  parser.add_argument("--k", type=int, default=16)
  parser.add_argument("--strategy", default="map")
  args = parser.parse_args()
  if args.worker:
    return worker(args)
  if "grid" in args.part:
    grid_part(args)
  if "devices" in args.part:
    devices_part(args)


if __name__ == "__main__":
  main()
