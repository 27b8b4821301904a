"""The simplex in one compiled program against the same points evaluated one call each.

N SmallCNNs (random inits: the cost does not depend on training), an eval set and
BatchNorm batches from the embedded shapes10 test split. Each case is timed as the
median of `--repeats` calls after one warm-up call (`first_call_s`: compilation
included), and printed as a JSON line:

  pairwise_one_call      `simplex.pairwise_barriers`: every pair's linear path at `--num_t` t;
  pairwise_per_pair      `barriers.evaluate_path_on_sets` once per pair (the same work);
  simplex_one_call       `simplex.evaluate_simplex` on `simplex_grid(N, num_samples)`;
  simplex_core           `simplex.simplex_metrics` (the same without the input checks);
  simplex_per_point      per point: `simplex.merged_variables` (mean + BatchNorm recomputed)
                         and `evaluation.mean_metrics`, one jitted call each;
  align_<method>_<kind>  `multi_align.align_models` (wall time; trained models are faster
                         to match than random ones, which have no structure to find).

`ratio` is the per-call loop's median over the one-call median, in the same run.

  python benchmarks/simplex.py                  # N = 4, SmallCNN(16), 512 examples
  python benchmarks/simplex.py --quick          # tiny sizes, 1 repeat (a check)
"""

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mechconn import align  # noqa: E402
from mechconn import barriers  # noqa: E402
from mechconn import evaluation  # noqa: E402
from mechconn import multi_align  # noqa: E402
from mechconn import simplex  # noqa: E402
from mechconn.data import pipeline  # noqa: E402
from mechconn.data.batching import stack_batches  # noqa: E402
from mechconn.models import get_model  # noqa: E402


def _timed(fn, repeats: int) -> dict:
  start = time.perf_counter()
  jax.block_until_ready(jax.tree.leaves(fn()))
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(jax.tree.leaves(fn()))
    times.append(time.perf_counter() - start)
  return {"first_call_s": round(first, 3), "median_s": round(statistics.median(times), 3)}


def _setup(args):
  model = get_model("small_cnn", 10, width=args.width)
  variables = [model.init(jax.random.key(s), jnp.zeros((2, 32, 32, 3)))
               for s in range(args.num_models)]
  views, labels = pipeline.load_test_views("shapes10", "box", num_examples=2 * args.examples)
  sets = {"clean": stack_batches(views["clean"][:args.examples], labels[:args.examples], 128)}
  stats = stack_batches(views["clean"][args.examples:], labels[args.examples:], 128,
                        drop_remainder=True)
  return model, variables, sets, {"image": stats["image"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_models", type=int, default=4)
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument("--examples", type=int, default=512)
  parser.add_argument("--num_t", type=int, default=11)
  parser.add_argument("--num_samples", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  if args.quick:
    args.width, args.examples, args.num_t, args.num_samples, args.repeats = 4, 128, 3, 2, 1
  model, variables, sets, stats = _setup(args)
  params = [v["params"] for v in variables]
  ts = np.linspace(0, 1, args.num_t)
  common = {"num_models": args.num_models, "width": args.width, "examples": args.examples,
            "backend": jax.default_backend()}
  one = _timed(lambda: simplex.pairwise_barriers(model.apply, params, ts, sets, stats)[
      "clean"].paths[(0, 1)].loss, args.repeats)
  loop = _timed(lambda: [barriers.evaluate_path_on_sets(
      model.apply, (params[i], params[j]), ts, sets, bn_batches=stats)["clean"].loss
      for i, j in itertools.combinations(range(args.num_models), 2)], args.repeats)
  print(json.dumps({"case": "pairwise_one_call", "num_t": args.num_t, **common, **one}))
  print(json.dumps({"case": "pairwise_per_pair", "num_t": args.num_t, **common, **loop,
                    "ratio": round(loop["median_s"] / one["median_s"], 2)}))
  grid = simplex.simplex_grid(args.num_models, num_samples=args.num_samples)
  one = _timed(lambda: simplex.evaluate_simplex(model.apply, params, grid, sets, stats)[
      "clean"].metrics["loss"], args.repeats)
  per_point = jax.jit(lambda w: evaluation.mean_metrics(
      model.apply, simplex.merged_variables(model.apply, params, stats, weights=w),
      sets["clean"])["loss"])
  loop = _timed(lambda: [per_point(jnp.asarray(w, jnp.float32)) for w in grid.weights],
                args.repeats)
  core = _timed(lambda: simplex.simplex_metrics(model.apply, params, grid.weights, sets, stats)[
      "clean"].metrics["loss"], args.repeats)
  points = {"points": len(grid.labels)}
  print(json.dumps({"case": "simplex_core", **points, **common, **core}))
  print(json.dumps({"case": "simplex_one_call", **points, **common, **one}))
  print(json.dumps({"case": "simplex_per_point", **points, **common, **loop,
                    "ratio": round(loop["median_s"] / one["median_s"], 2)}))
  spec = align.permutation_spec("small_cnn", params[0])
  batches = [jnp.asarray(b) for b in sets["clean"]["image"]]
  for method, kind in itertools.product(multi_align.METHODS, multi_align.MATCHINGS):
    result = multi_align.align_models(spec, variables, method=method, matching=kind,
                                      apply_fn=model.apply, batches=batches, post=jax.nn.relu)
    print(json.dumps({"case": f"align_{method}_{kind}", **common,
                      "seconds": round(result.seconds, 3), "sweeps": result.sweeps}))


if __name__ == "__main__":
  main()
