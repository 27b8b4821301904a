"""The adaptive, certified barrier maximum against a 101-point grid on trained pairs (JSON lines).

For each pair of trained end points (C2: the cue and no-cue models; C3: the
same pair after weight matching, and after activation matching), each view
and each barrier metric: the barrier on a 101-point grid (`path_core.path_metrics`),
the adaptive maximum (`diagnostics.adaptive.adaptive_barrier`, tol 0.01), the
t each evaluated (forward passes over the view), |difference|, the ratio of
evaluations and wall times (first calls: compilation included; `--repeat`
adds a second, compiled adaptive call). End points, views, BatchNorm batches
and alignments are those of the eval_path task (`mechconn.tasks.eval_path`).

Train the end points first (experiments/configs/train.py: cpu_cue, cpu_nocue), then

  python benchmarks/adaptive_max.py --views=clean --settings=5:4:2
  python benchmarks/adaptive_max.py --settings=5:4:2,9:4:2,5:4:1.5 --alignments=none,weight

Pairs workdir/claims/train_cue_{k} and train_nocue_{k} are added where they exist.
"""

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.configs import eval_path as eval_path_config  # noqa: E402
from mechconn import mesh as mesh_lib  # noqa: E402
from mechconn import path_core  # noqa: E402
from mechconn.diagnostics import adaptive  # noqa: E402
from mechconn.tasks import eval_path  # noqa: E402

WORKDIR = "/work/main/workdir"
CASES = {"none": "C2", "weight": "C3", "activation": "C3"}


def pair_spec(start: str, end: str, align: str) -> eval_path.EvalPathSpec:
  """The cpu eval_path spec between two train runs (no fitted curves)."""
  config = eval_path_config.get_config("cpu")
  config.unlock()
  config.start_workdir, config.end_workdir = start, end
  config.curve_workdirs = ()
  config.align = align
  return eval_path.resolve(config, num_devices=1)


def timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def grid_line(apply_fn, points, batches, bn_batches, renormalize, num_t):
  """({metric: (barrier, t)}, seconds) of the grid's path_metrics (first call: compiling)."""
  ts = np.linspace(0, 1, num_t)
  run = lambda: path_core.path_metrics(apply_fn, points, ts, {"view": batches}, bn_batches,
                                       renormalize=renormalize)["view"]
  evaluated, seconds = timed(run)
  summary = evaluated.summary()
  return {m: (summary[m], summary[f"{m}_t"]) for m in ("loss", "error")}, seconds


def adaptive_line(apply_fn, points, batches, bn_batches, renormalize, metric, setting, args):
  initial, per_round, safety = setting
  run = lambda: adaptive.adaptive_barrier(
      apply_fn, points, batches, bn_batches, metric=metric, renormalize=renormalize,
      tol=args.tol, initial=initial, per_round=per_round, safety=safety)
  result, seconds = timed(run)
  again = timed(run)[1] if args.repeat else None
  return result, seconds, again


def pairs(args) -> list[tuple[str, str, str]]:
  found = [("default", args.start, args.end)]
  k = 0
  while all(os.path.isdir(f"{WORKDIR}/claims/train_{w}_{k}") for w in ("cue", "nocue")):
    found.append((f"claims_{k}", f"{WORKDIR}/claims/train_cue_{k}",
                  f"{WORKDIR}/claims/train_nocue_{k}"))
    k += 1
  return found


def evaluate_case(name, start, end, align, args):
  spec = pair_spec(start, end, align)
  inputs, _ = eval_path.inputs(spec, dry_run=False)
  views, bn_batches, _ = eval_path.eval_data(spec, mesh_lib.data_mesh())
  start_run = inputs.endpoints.start
  apply_fn = start_run.spec.apply_fn(start_run.model)
  points = (start_run.params, inputs.endpoints.end.params)
  if align != "none":
    (_, points), _ = eval_path.aligned_path(spec, inputs.endpoints, bn_batches)
  renormalize = spec.path.renormalize
  for view in args.views.split(","):
    grid, grid_s = grid_line(apply_fn, points, views[view], bn_batches, renormalize,
                             args.grid)
    for metric in ("loss", "error"):
      for setting in args.settings:
        result, seconds, again = adaptive_line(apply_fn, points, views[view], bn_batches,
                                               renormalize, metric, setting, args)
        barrier, barrier_t = grid[metric]
        print(json.dumps({
            "case": CASES[align], "pair": name, "alignment": align, "view": view,
            "metric": metric, "tol": args.tol, "initial": setting[0],
            "per_round": setting[1], "safety": setting[2],
            "grid_barrier": round(barrier, 5), "grid_t": round(barrier_t, 3),
            "grid_evaluations": args.grid, "grid_seconds": round(grid_s, 2),
            "adaptive_barrier": round(result.value, 5), "adaptive_t": round(result.t, 4),
            "upper_bound": round(result.upper_bound, 5), "certified": result.certified,
            "curvature_bound": round(result.curvature_bound, 2),
            "adaptive_evaluations": result.num_evaluations, "rounds": result.num_rounds,
            "adaptive_seconds": round(seconds, 2),
            "adaptive_seconds_compiled": again and round(again, 2),
            "abs_difference": round(abs(result.value - barrier), 5),
            "within_tol": abs(result.value - barrier) <= args.tol,
            "evaluation_ratio": round(args.grid / result.num_evaluations, 2),
            "backend": jax.default_backend()}), flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--start", default=f"{WORKDIR}/cpu_cue")
  parser.add_argument("--end", default=f"{WORKDIR}/cpu_nocue")
  parser.add_argument("--alignments", default="none,weight,activation")
  parser.add_argument("--views", default="clean")
  parser.add_argument("--tol", type=float, default=0.01)
  parser.add_argument("--grid", type=int, default=101)
  parser.add_argument("--settings", default="5:4:2",
                      help="initial:per_round:safety, comma-separated")
  parser.add_argument("--repeat", action="store_true",
                      help="time a second, compiled adaptive call")
  args = parser.parse_args()
  args.settings = [(int(i), int(p), float(s)) for i, p, s in
                   (x.split(":") for x in args.settings.split(","))]
  for name, start, end in pairs(args):
    for align in args.alignments.split(","):
      evaluate_case(name, start, end, align, args)


if __name__ == "__main__":
  main()
