"""The diagnostics' cost against plain path evaluation on the trained SmallCNN pair (JSON lines).

On the embedded SmallCNN pair (train.py's cpu_cue at t = 0, cpu_nocue at t = 1: the
linear path, `--alignments=none,weight` adds the weight-aligned one), with the end
points, views and BatchNorm batches of the eval_path task (`mechconn.tasks.eval_path`),
each view's first `--num_examples` test examples (`path_diagnostics.first_examples`, as
eval_path's diagnostics read them) and `--num_t` t. Each case is timed as the median of
`--repeats` calls after one warm-up call (`first_call_s`: compilation included):

  path_metrics          the baseline: `path_core.path_metrics` on the views;
  layerwise_all         `layerwise_barriers`, groups = the permutation spec, every mode
                        and anchor; `ratio_per_path` = median_s / (configurations x
                        baseline), configurations = groups x modes x anchors;
  layerwise_only_a      the same with modes=('only',), anchors=('a',);
  feature_connectivity  default sites;
  curvature             `path_curvature` on `--curvature_examples` clean examples, one
                        eigenvalue, num_matvecs in {5, 10}, num_probes in {0, 4};
  curvature_hvp         seconds per Hessian-vector product per t, from the differences
                        between those settings (the line says how);
  calibrated_path       temperature fitted on 1,000 held-out clean examples (a fresh draw
                        of the embedded test split, `path_diagnostics.calibration_batches`);
  grid_101, adaptive_barrier   per view: the loss barrier on a 101-t `path_metrics` grid
                        and by `adaptive.adaptive_barrier` (tol 0.01): evaluations, times.

`ratio_to_path_eval` is median_s / the baseline's median_s measured in the same run on
the same path. Train the end points first (experiments/configs/train.py: cpu_cue,
cpu_nocue), then

  python benchmarks/diagnostics.py                 # defaults: 11 t, 500 examples per view
  python benchmarks/diagnostics.py --quick         # tiny sizes, 3 t, 1 repeat (a check)
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
from mechconn import align  # noqa: E402
from mechconn import mesh as mesh_lib  # noqa: E402
from mechconn import path_core  # noqa: E402
from mechconn.diagnostics import adaptive, calibration, curvature, features  # noqa: E402
from mechconn.diagnostics import groups as groups_lib  # noqa: E402
from mechconn.diagnostics import layerwise  # noqa: E402
from mechconn.tasks import eval_path, path_diagnostics  # noqa: E402

WORKDIR = "/work/main/workdir"
CURVATURE_SETTINGS = ((5, 0), (10, 0), (5, 4), (10, 4))  # (num_matvecs, num_probes)
QUICK = {"num_t": 3, "repeats": 1, "num_examples": 64, "bn_examples": 64,
         "curvature_examples": 32, "calibration_examples": 64, "eval_batch": 32, "grid": 11}


def timed(fn, repeats: int) -> tuple[object, float, float]:
  """(output, first call's seconds, median seconds of `repeats` calls after it)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return out, first, float(np.median(times))


def emit(case: str, first: float | None, median: float, baseline: float | None, args,
         **fields):
  """Prints one JSON line of the benchmark (first None: a derived line, nothing called)."""
  line = {"benchmark": "diagnostics", "case": case, "median_s": round(median, 4),
          "ratio_to_path_eval": None if baseline is None else round(median / baseline, 3),
          "first_call_s": None if first is None else round(first, 3), **fields,
          "backend": jax.default_backend(), "num_t": args.num_t,
          "num_examples": args.num_examples}
  print(json.dumps(line), flush=True)


def load_pair(args) -> dict:
  """The eval_path task's end points, paths, views and batches, cut to the benchmark's sizes."""
  config = eval_path_config.get_config("cpu")
  config.unlock()
  config.start_workdir, config.end_workdir = args.start, args.end
  config.curve_workdirs = ()
  config.align = "weight" if "weight" in args.alignments else "none"
  config.path.bn_examples = args.bn_examples
  config.eval_batch_size = args.eval_batch
  spec = eval_path.resolve(config, num_devices=1)
  inputs, _ = eval_path.inputs(spec, dry_run=False)
  all_views, bn_batches, _ = eval_path.eval_data(spec, mesh_lib.data_mesh())
  start_run = inputs.endpoints.start
  paths = {"linear": (start_run.params, inputs.endpoints.end.params)}
  if "weight" in args.alignments:
    (_, paths["linear (aligned)"]), _ = eval_path.aligned_path(
        spec, inputs.endpoints, bn_batches)
  views = path_diagnostics.first_examples({v: all_views[v] for v in args.views},
                                          args.num_examples)
  curvature_set = path_diagnostics.first_examples({"clean": all_views["clean"]},
                                                  args.curvature_examples)["clean"]
  held_out = path_diagnostics.calibration_batches(spec.data, args.calibration_examples,
                                                  spec.eval_batch_size)
  return {"apply_fn": start_run.spec.apply_fn(start_run.model), "paths": paths,
          "views": views, "bn_batches": bn_batches, "curvature_set": curvature_set,
          "calibration_set": held_out, "renormalize": spec.path.renormalize,
          "perm_spec": align.permutation_spec("small_cnn", start_run.params)}


def bench_baselines(d, points, ts, args, name) -> float:
  """The plain path evaluation on the views (the baseline) and on the curvature's set."""
  common = dict(renormalize=d["renormalize"])
  _, first, base = timed(lambda: path_core.path_metrics(
      d["apply_fn"], points, ts, d["views"], d["bn_batches"], **common), args.repeats)
  emit("path_metrics", first, base, base, args, path=name, views=args.views)
  _, first, seconds = timed(lambda: path_core.path_metrics(
      d["apply_fn"], points, ts, {"clean": d["curvature_set"]}, d["bn_batches"], **common),
      args.repeats)
  emit("path_metrics_curvature_set", first, seconds, base, args, path=name, views=["clean"],
       examples=args.curvature_examples)
  return base


def bench_layerwise(d, points, ts, args, name, base) -> None:
  """Layer-wise barriers over the permutation spec's groups, all and one (mode, anchor)."""
  num_groups = len(groups_lib.parameter_groups(points[0], d["perm_spec"]))
  for case, modes, anchors in (("layerwise_all", layerwise.MODES, layerwise.ANCHORS),
                               ("layerwise_only_a", ("only",), ("a",))):
    run = lambda: layerwise.layerwise_barriers(  # noqa: E731
        d["apply_fn"], points, ts, d["views"], d["bn_batches"], groups=d["perm_spec"],
        modes=modes, anchors=anchors, renormalize=d["renormalize"])
    _, first, seconds = timed(run, args.repeats)
    configurations = num_groups * len(modes) * len(anchors)
    emit(case, first, seconds, base, args, path=name, groups=num_groups, modes=list(modes),
         anchors=list(anchors), configurations=configurations,
         ratio_per_path=round(seconds / (configurations * base), 3))


def bench_features(d, points, ts, args, name, base) -> None:
  """Feature connectivity at the default sites."""
  run = lambda: features.feature_connectivity(  # noqa: E731
      d["apply_fn"], points, ts, d["views"], d["bn_batches"], renormalize=d["renormalize"])
  result, first, seconds = timed(run, args.repeats)
  emit("feature_connectivity", first, seconds, base, args, path=name,
       sites=sorted(next(iter(result.cosine.values())).keys()))


def bench_curvature(d, points, ts, args, name, base) -> None:
  """Curvature at each (num_matvecs, num_probes) setting, then the per-product cost."""
  seconds = {}
  for matvecs, probes in CURVATURE_SETTINGS:
    run = lambda: curvature.path_curvature(  # noqa: E731
        d["apply_fn"], points, ts, d["curvature_set"], d["bn_batches"],
        renormalize=d["renormalize"], num_eigenvalues=1, num_matvecs=matvecs,
        num_probes=probes)
    result, first, seconds[matvecs, probes] = timed(run, args.repeats)
    emit("curvature", first, seconds[matvecs, probes], base, args, path=name,
         num_matvecs=matvecs, num_probes=probes, hvp_per_t=matvecs + probes,
         examples=args.curvature_examples, num_parameters=result.num_parameters,
         seconds_per_t=round(seconds[matvecs, probes] / args.num_t, 4))
  emit_hvp_cost(seconds, base, args, name)


def emit_hvp_cost(seconds: dict, base: float, args, name: str) -> None:
  """Seconds per Hessian-vector product per t, from differences between curvature settings."""
  k = args.num_t
  lanczos = ((seconds[10, 0] - seconds[5, 0]) + (seconds[10, 4] - seconds[5, 4])) / (2 * 5 * k)
  probe = ((seconds[5, 4] - seconds[5, 0]) + (seconds[10, 4] - seconds[10, 0])) / (2 * 4 * k)
  fixed = seconds[5, 0] / k - 5 * lanczos
  products = np.array([m + p for m, p in seconds], float)  # one design row per setting
  fit = np.linalg.lstsq(np.stack([np.ones_like(products), products], 1),
                        np.array(list(seconds.values())) / k, rcond=None)[0]
  emit("curvature_hvp", None, lanczos * k, base, args, path=name,
       lanczos_matvec_s_per_t=round(lanczos, 5), hutchinson_probe_s_per_t=round(probe, 5),
       fixed_s_per_t=round(fixed, 5), fit_hvp_s_per_t=round(fit[1], 5),
       fit_fixed_s_per_t=round(fit[0], 5),
       how=("lanczos: mean over num_probes in {0, 4} of (T(10 matvecs) - T(5)) / (5 K); "
            "probe: mean over num_matvecs in {5, 10} of (T(4 probes) - T(0)) / (4 K); "
            "fixed: T(5, 0) / K - 5 x lanczos (statistics, end points, outside products); "
            "fit: least squares of T / K = fixed + hvp x (matvecs + probes) over the 4 "
            "settings; "
            "median_s: lanczos x K, one product at every t (derived, not called)"))


def bench_calibration(d, points, ts, args, name, base) -> None:
  """The calibrated path, its temperature fitted on the held-out clean set."""
  run = lambda: calibration.calibrated_path(  # noqa: E731
      d["apply_fn"], points, ts, d["views"], d["calibration_set"], d["bn_batches"],
      renormalize=d["renormalize"])
  _, first, seconds = timed(run, args.repeats)
  emit("calibrated_path", first, seconds, base, args, path=name,
       calibration_examples=args.calibration_examples)


def bench_adaptive(d, points, args, name, base) -> None:
  """Per view: the loss barrier on a dense grid and adaptively (evaluations and times)."""
  grid_ts = np.linspace(0, 1, args.grid)
  for view, batches in d["views"].items():
    grid = lambda: path_core.path_metrics(  # noqa: E731
        d["apply_fn"], points, grid_ts, {view: batches}, d["bn_batches"],
        renormalize=d["renormalize"])[view]
    evaluated, first, grid_s = timed(grid, args.repeats)
    barrier = evaluated.summary()["loss"]
    emit("grid_101" if args.grid == 101 else f"grid_{args.grid}", first, grid_s, base, args,
         path=name, view=view, evaluations=args.grid, barrier=round(barrier, 5))
    run = lambda: adaptive.adaptive_barrier(  # noqa: E731
        d["apply_fn"], points, batches, d["bn_batches"], metric="loss", tol=args.tol,
        renormalize=d["renormalize"])
    result, first, seconds = timed(run, args.repeats)
    emit("adaptive_barrier", first, seconds, base, args, path=name, view=view, tol=args.tol,
         evaluations=result.num_evaluations, rounds=result.num_rounds,
         barrier=round(result.value, 5), certified=result.certified,
         abs_difference_to_grid=round(abs(result.value - barrier), 5),
         grid_evaluations=args.grid, evaluation_ratio=round(args.grid / result.num_evaluations, 2),
         speedup_vs_grid=round(grid_s / seconds, 2))


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--start", default=f"{WORKDIR}/cpu_cue")
  parser.add_argument("--end", default=f"{WORKDIR}/cpu_nocue")
  parser.add_argument("--alignments", default="none", help="none and/or weight, comma-separated")
  parser.add_argument("--views", default="clean,cue")
  parser.add_argument("--num_t", type=int, default=11)
  parser.add_argument("--num_examples", type=int, default=500, help="test examples per view")
  parser.add_argument("--bn_examples", type=int, default=1024)
  parser.add_argument("--curvature_examples", type=int, default=256)
  parser.add_argument("--calibration_examples", type=int, default=1000)
  parser.add_argument("--eval_batch", type=int, default=128)
  parser.add_argument("--grid", type=int, default=101, help="t of the adaptive maximum's grid")
  parser.add_argument("--tol", type=float, default=0.01)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--cases", default="layerwise,features,curvature,calibration,adaptive")
  parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 t, 1 repeat")
  args = parser.parse_args()
  if args.quick:
    for key, value in QUICK.items():
      setattr(args, key, value)
  args.views = args.views.split(",")
  args.alignments = args.alignments.split(",")
  args.cases = args.cases.split(",")
  return args


def main():
  args = parse_args()
  print(json.dumps({"benchmark": "diagnostics", "case": "loadavg_start",
                    "loadavg": os.getloadavg(), "cpus": os.cpu_count()}), flush=True)
  d = load_pair(args)
  ts = np.linspace(0, 1, args.num_t)
  for name, points in d["paths"].items():
    base = bench_baselines(d, points, ts, args, name)
    if "layerwise" in args.cases:
      bench_layerwise(d, points, ts, args, name, base)
    if "features" in args.cases:
      bench_features(d, points, ts, args, name, base)
    if "curvature" in args.cases:
      bench_curvature(d, points, ts, args, name, base)
    if "calibration" in args.cases:
      bench_calibration(d, points, ts, args, name, base)
    if "adaptive" in args.cases:
      bench_adaptive(d, points, args, name, base)
  print(json.dumps({"benchmark": "diagnostics", "case": "loadavg_end",
                    "loadavg": os.getloadavg()}), flush=True)


if __name__ == "__main__":
  main()
