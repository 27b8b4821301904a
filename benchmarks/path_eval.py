"""Benchmark: evaluate_path strategies over t against a Python loop and plain vmap.

Work per run (defaults): K = 16 t values on the linear path between two random
inits; at each t, BatchNorm statistics recomputed from 8 batches of 128 and
loss/accuracy over 2,048 eval examples (batches of 128), 32x32x3 inputs.

Compared on each model:
  loop   (a): a Python loop over t calling one jitted single-point evaluation
              (same work per t);
  vmap   (b): strategy='vmap' (plain jax.vmap over t);
  map, chunked: the other strategies; 'default' is DEFAULT_STRATEGY.
Also measures this machine's float32 and bfloat16 matmul peaks in the same run
(n = 2048 on CPU, 8192 elsewhere: large enough to saturate the device).

Prints one JSON line per (model, method): median seconds over --repeats runs
after one warm-up (compile) run, ratios to (a) and (b), achieved GFLOP/s (model
forward FLOPs from the layer shapes, `mechconn.flops`, times examples times K)
and its fraction of the measured matmul peak of the compute dtype (`--dtype`:
float32, the default, or bfloat16 compute with float32 parameters and BatchNorm
statistics, as `model.dtype`). `--skip` leaves out any of the methods (the ratio
to the loop is then null).

  python benchmarks/path_eval.py                 # SmallCNN(32) and VGG13(0.5)
  python benchmarks/path_eval.py --models=vgg13 --vgg_width=0.25 --repeats=3
  python benchmarks/path_eval.py --models=small_cnn,causal_lm --skip=vmap   # the LM too
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mechconn import adapters, barriers, batchnorm, evaluation, objectives, paths
from mechconn import flops as flops_lib
from mechconn.flops import DEFAULT_PEAK_N, PEAK_N, matmul_peak_flops  # noqa: F401
from mechconn.data import sequences
from mechconn.models import CausalLM, get_model


def median_seconds(fn, repeats: int, check=None) -> float:
  """Median wall time of fn() over `repeats` runs after one warm-up (compile) run."""
  out = jax.block_until_ready(fn())  # warm-up: compile
  if check is not None:
    check(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def peaks() -> dict[str, float]:
  """{'float32': FLOP/s, 'bfloat16': FLOP/s}, printed as JSON lines (the benchmarks' peaks)."""
  out = {}
  for dtype in ("float32", "bfloat16"):
    out[dtype] = matmul_peak_flops(dtype=dtype)
    print(json.dumps({"benchmark": "matmul_peak", "dtype": dtype,
                      "n": PEAK_N.get(jax.default_backend(), DEFAULT_PEAK_N),
                      "gflops": round(out[dtype] / 1e9, 1)}), flush=True)
  return out


def evaluate_point(apply_fn, params, eval_batches, bn_batches,
                   objective=objectives.CLASSIFICATION):
  """The objective's metrics of one parameter set, BatchNorm statistics recomputed (one t)."""
  variables = {"params": params}
  if bn_batches is not None:
    variables["batch_stats"] = batchnorm.recompute_batch_stats(apply_fn, variables, bn_batches)
  return evaluation.mean_metrics(apply_fn, variables, eval_batches, objective)["loss"]


def bench_model(name, model, args, peak):
  """An image classifier between two random inits (BatchNorm recomputed where it has it)."""
  image_shape = (32, 32, 3)
  rng = np.random.default_rng(0)
  va = model.init(jax.random.key(0), jnp.zeros((2,) + image_shape))
  vb = model.init(jax.random.key(1), jnp.zeros((2,) + image_shape))
  points = (va["params"], vb["params"])
  n_eval = args.eval_examples
  eval_batches = {
      "image": jnp.asarray(rng.normal(size=(n_eval // args.eval_batch, args.eval_batch)
                                      + image_shape).astype(np.float32)),
      "label": jnp.asarray(rng.integers(0, 10, (n_eval // args.eval_batch, args.eval_batch))),
      "mask": jnp.ones((n_eval // args.eval_batch, args.eval_batch), jnp.float32)}
  bn_batches = {"image": jnp.asarray(rng.normal(
      size=(args.bn_batches, args.bn_batch) + image_shape).astype(np.float32))}
  # From the layer shapes (mechconn.flops): XLA's cost analysis misses cuDNN convolutions.
  flops = flops_lib.forward_flops(model.apply, va, (1,) + image_shape) * args.num_t * (
      n_eval + args.bn_batches * args.bn_batch)
  bench_path(name, model.apply, points, eval_batches, bn_batches, objectives.CLASSIFICATION,
             flops, args, peak)


def bench_lm(args, peak):
  """The causal transformer LM of docs/any_model.md between two random inits (next-token
  loss on recall sequences; no BatchNorm). FLOPs are not counted (attention's einsums are
  not layer shapes `mechconn.flops` knows): only times and ratios are reported."""
  model = CausalLM(sequences.VOCAB_SIZE, sequences.SEQ_LEN, width=args.lm_width, depth=2,
                   num_heads=2)
  n_batches = args.eval_examples // args.eval_batch
  data = sequences.recall_sequences(n_batches * args.eval_batch, seed=0)
  eval_batches = {k: jnp.asarray(v.reshape(n_batches, args.eval_batch, -1))
                  for k, v in data.items()}
  points = tuple(model.init(jax.random.key(k), eval_batches["tokens"][0])["params"]
                 for k in (0, 1))
  bench_path(f"causal_lm(width={args.lm_width})", adapters.without_train(model.apply), points,
             eval_batches, None, objectives.next_token(), None, args, peak)


def bench_path(name, apply_fn, points, eval_batches, bn_batches, objective, flops, args, peak):
  """Times every method on one path and prints a JSON line per method."""
  ts = np.linspace(0, 1, args.num_t)
  linear = paths.path_fn("linear")
  point = jax.jit(lambda pts, t, ev, bn: evaluate_point(apply_fn, linear(pts, t), ev, bn,
                                                        objective))
  ts_dev = [jnp.float32(t) for t in ts]

  def loop():
    return [point(points, t, eval_batches, bn_batches) for t in ts_dev]

  def strategy(s):
    return lambda: barriers.evaluate_path(apply_fn, points, ts, eval_batches,
                                          bn_batches=bn_batches, strategy=s,
                                          chunk_size=args.chunk_size, objective=objective).loss

  default = barriers.DEFAULT_STRATEGY.get(jax.default_backend(), "map")
  methods = {"loop": loop, "map": strategy("map"), "chunked": strategy("chunked"),
             "vmap": strategy("vmap")}
  # Check the methods agree before timing them.
  ref = np.array([float(l) for l in loop()])

  def agrees(out):  # every method computes the same losses as the loop
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-4, atol=2e-4)

  seconds = {}
  for m, fn in methods.items():
    if m in args.skip:
      continue
    print(f"timing {name} {m}", file=sys.stderr, flush=True)
    reps = args.vmap_repeats if m == "vmap" else args.repeats
    seconds[m] = median_seconds(fn, reps, check=None if m == "loop" else agrees)
  n_eval = int(np.prod(jax.tree.leaves(eval_batches)[0].shape[:2]))
  for m, s in seconds.items():
    line = {"benchmark": "path_eval", "model": name, "method": m,
            "is_default": m == default, "backend": jax.default_backend(),
            "dtype": args.dtype, "num_t": args.num_t, "eval_examples": n_eval,
            "bn_examples": 0 if bn_batches is None else args.bn_batches * args.bn_batch,
            "median_s": round(s, 4),
            "vs_loop": round(s / seconds["loop"], 3) if "loop" in seconds else None,
            "speedup_vs_vmap": round(seconds["vmap"] / s, 2) if "vmap" in seconds else None,
            "gflops": None if flops is None else round(flops / s / 1e9, 1),
            "fraction_of_peak": None if flops is None else round(flops / s / peak, 3),
            "peak_gflops": round(peak / 1e9, 1)}
    print(json.dumps(line), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="small_cnn,vgg13")
  parser.add_argument("--small_cnn_width", type=int, default=32)
  parser.add_argument("--vgg_width", type=float, default=0.5)
  parser.add_argument("--lm_width", type=int, default=64)
  parser.add_argument("--num_t", type=int, default=16)
  parser.add_argument("--eval_examples", type=int, default=2048)
  parser.add_argument("--eval_batch", type=int, default=128)
  parser.add_argument("--bn_batches", type=int, default=8)
  parser.add_argument("--bn_batch", type=int, default=128)
  parser.add_argument("--chunk_size", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--vmap_repeats", type=int, default=2)
  parser.add_argument("--skip", default="", help="comma-separated methods not to time")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="the models' compute dtype (parameters stay float32)")
  args = parser.parse_args()
  args.skip = [s for s in args.skip.split(",") if s]
  peak = peaks()[args.dtype]
  for name in args.models.split(","):
    if name == "small_cnn":
      model = get_model("small_cnn", 10, width=args.small_cnn_width, dtype=args.dtype)
      label = f"small_cnn(width={args.small_cnn_width})"
    elif name == "vgg13":
      model = get_model("vgg13", 10, width=args.vgg_width, dtype=args.dtype)
      label = f"vgg13(width={args.vgg_width})"
    elif name == "causal_lm":
      bench_lm(args, peak)
      continue
    else:
      raise ValueError(f"Unknown benchmark model {name!r}; valid: small_cnn, vgg13, "
                       "causal_lm.")
    bench_model(label, model, args, peak)
  print(json.dumps({"benchmark": "matmul_peak_after", "dtype": args.dtype,
                    "gflops": round(matmul_peak_flops(dtype=args.dtype) / 1e9, 1)}), flush=True)


if __name__ == "__main__":
  main()
