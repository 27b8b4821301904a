"""The `merge` task: N models merged into one, without alignment, by MergeMany, synchronised.

The end points are N finished `train` runs (`endpoints.workdirs`) or trained here (the
recipe `endpoints.train` per seed of `endpoints.seeds`, through the train task, into
`<endpoints.directory or workdir/endpoints>/seed_<s>`; a finished run is reused). For each
method (`none`: the plain average; `multi_align.METHODS`: units matched into model 0's
frame first) and each n of `sizes`, the first n end points are aligned (timed), averaged,
and the merged model (BatchNorm recomputed) evaluated on the four views. For all N: the
simplex they span (its largest barrier and where), every pair's linear path and the cycle
error of the pairwise maps (0 by construction; the independent pairwise matchings' beside
it). Writes `merge.json` (every number, the end points' identities, the config, the times),
`merge.png` (`plot_merge`); prints `format_table`.
"""

import dataclasses
import functools
import itertools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mechconn import align
from mechconn import config_checks as checks
from mechconn import dry_run as dry_run_lib
from mechconn import multi_align
from mechconn import simplex
from mechconn import symmetry
from mechconn import workdir as workdir_lib
from mechconn.data.views import VIEWS
from mechconn.tasks import eval_path
from mechconn.tasks import model_checks
from mechconn.tasks import records
from mechconn.tasks import runner
from mechconn.tasks import runs
from mechconn.tasks import specs
from mechconn.tasks import train as train_task

NAME = "merge"
MERGE_FILE = "merge.json"
MERGE_FIGURE = "merge.png"
LAYOUT = workdir_lib.Layout(files=(MERGE_FILE, MERGE_FIGURE))
METHODS = ("none", *multi_align.METHODS)  # 'none': the plain average, no alignment
ENDPOINTS_DIR = "endpoints"  # <workdir>/endpoints/seed_<s>: the end points trained here


@dataclasses.dataclass(frozen=True)
class MergeSpec:
  """A `merge` config, resolved."""

  seed: int  # matching's order of groups, MergeMany's order of models, the Dirichlet draws
  data: specs.ImageData
  seeds: tuple[int, ...]  # an end point trained here per seed; (): workdirs given
  trains: tuple[train_task.TrainSpec, ...]  # their recipes, one per seed
  train_configs: tuple[dict, ...]  # the configs those were resolved from (recorded per run)
  workdirs: tuple[str, ...]  # or: finished runs as the end points
  directory: str  # where the trained end points go ('': <workdir>/endpoints)
  stand_in: specs.ModelSpec  # the dry run's model before the end points exist
  sizes: tuple[int, ...]
  methods: tuple[str, ...]
  matching: str
  activation_sites: str
  max_sweeps: int
  num_samples: int
  concentration: float
  path: specs.PathSpec
  bn_data: str
  eval_batch_size: int
  dry_run: bool

  @property
  def num_models(self) -> int:
    return len(self.seeds or self.workdirs)

  @property
  def grid(self) -> simplex.SimplexGrid:  # the points of the simplex of all N evaluated
    return simplex.simplex_grid(self.num_models, num_samples=self.num_samples,
                                concentration=self.concentration, seed=self.seed)


def _endpoint_fields(config: specs.Section, num_devices: int) -> dict:
  """The checked `endpoints` section: exactly one of seeds and workdirs, and the recipe."""
  ends = config.endpoints
  seeds, workdirs = tuple(ends.seeds), tuple(ends.workdirs)
  if bool(seeds) == bool(workdirs) or len(seeds or workdirs) < 2:
    raise ValueError(f"config.endpoints.seeds={seeds}, config.endpoints.workdirs={workdirs}: "
                     "give one of them, of 2 or more end points (seeds: one trained per seed; "
                     "workdirs: finished train runs).")
  if seeds:
    checks.check_seeds(seeds, "endpoints.seeds")
  if "" in workdirs or len(set(map(os.path.realpath, workdirs))) < len(workdirs):
    raise ValueError(f"config.endpoints.workdirs={workdirs} must be distinct finished runs.")
  if ends.train.dry_run:
    raise ValueError("config.endpoints.train.dry_run=True would dry-run one end point; the "
                     "task's dry run is config.dry_run=True.")
  recipe, data = (workdir_lib.config_to_dict(c) for c in (ends.train, config.data))
  train_configs = tuple({**recipe, "seed": s, "data": data} for s in seeds)  # end point s's
  try:
    trains = tuple(train_task.resolve(ml_collections.ConfigDict(c), num_devices)
                   for c in train_configs)
  except ValueError as e:
    raise ValueError(f"config.endpoints.train (the recipe): {e}") from e
  return dict(seeds=seeds, workdirs=workdirs, trains=trains, train_configs=train_configs,
              directory=ends.directory, stand_in=specs.model_spec(
                  ends.train.model, "endpoints.train.model", dataset=config.data.dataset))


def resolve(config: ml_collections.ConfigDict, num_devices: int) -> MergeSpec:
  """A `merge` config, checked before any work (ValueError naming the key)."""
  checks.check_int(config.seed, "seed")
  data = specs.data_spec(config.data, NAME)
  ends = _endpoint_fields(config, num_devices)
  num_models = len(ends["seeds"] or ends["workdirs"])
  sizes, methods = tuple(config.sizes), tuple(config.align.methods)
  for i, n in enumerate(sizes):
    checks.check_int(n, f"sizes[{i}]", minimum=2)
  if not sizes or list(sizes) != sorted(set(sizes)) or max(sizes) > num_models:
    raise ValueError(f"config.sizes={sizes} must increase, without repeats, to at most the "
                     f"{num_models} end points (n: the first n end points merged).")
  for i, method in enumerate(methods):
    checks.check_choice(method, METHODS, f"align.methods[{i}]")
  if not methods or len(set(methods)) < len(methods):
    raise ValueError(f"config.align.methods={methods} must be non-empty, without repeats.")
  checks.check_choice(config.align.matching, multi_align.MATCHINGS, "align.matching")
  checks.check_choice(config.align.activation_sites, tuple(eval_path.ACTIVATION_SITES),
                      "align.activation_sites")
  checks.check_positive_int(config.align.max_sweeps, "align.max_sweeps")
  checks.check_int(config.simplex.num_samples, "simplex.num_samples")
  checks.check_number(config.simplex.concentration, "simplex.concentration", low=0.0,
                      low_open=True)
  checks.check_choice(config.path.bn_data, eval_path.BN_DATA, "path.bn_data")
  path = specs.path_spec(config.path)
  eval_batch = specs.eval_batch_size(config.eval_batch_size, num_devices)
  if not eval_batch <= path.bn_examples <= data.num_train_examples:
    raise ValueError(f"config.path.bn_examples={path.bn_examples} must make a full batch of "
                     f"eval_batch_size={eval_batch} and be at most the "
                     f"{data.num_train_examples} training examples.")
  model_checks.check_bn_variance(path, ends["stand_in"].build(), data.input_shape)
  return MergeSpec(seed=config.seed, data=data, **ends, sizes=sizes, methods=methods,
                   matching=config.align.matching,
                   activation_sites=config.align.activation_sites,
                   max_sweeps=config.align.max_sweeps, num_samples=config.simplex.num_samples,
                   concentration=config.simplex.concentration, path=path,
                   bn_data=config.path.bn_data, eval_batch_size=eval_batch,
                   dry_run=config.dry_run)


def _stand_ins(spec: MergeSpec) -> list[runs.TrainedModel]:
  """Fresh inits of the stand-in model: a dry run's end points before they exist."""
  model = spec.stand_in.build()
  sample = jnp.zeros((1, *spec.data.input_shape), jnp.float32)
  inits = (model.init(jax.random.key(i), sample) for i in range(spec.num_models))
  return [runs.TrainedModel(model=model, params=v["params"], batch_stats=v.get("batch_stats", {}),
                            config={}, checkpoint="", spec=spec.stand_in) for v in inits]


def check_models(models: list[runs.TrainedModel], spec: MergeSpec) -> None:
  """One model (and dtype), trained on this config's data, and no two runs of equal weights."""
  for run in models[1:]:
    runs.check_endpoints(models[0], run, spec.data)
  model, shape = models[0].model, spec.data.input_shape
  if spec.matching == "activation":
    model_checks.check_activation_sites(spec.activation_sites, model, shape)
  model_checks.check_bn_variance(spec.path, model, shape)
  leaves = [jax.device_get(jax.tree.leaves(m.params)) for m in models]
  for i, j in itertools.combinations(range(len(models)), 2):
    if all(np.array_equal(a, b) for a, b in zip(leaves[i], leaves[j])):
      raise ValueError(f"End points {i} ({models[i].checkpoint}) and {j} ({models[j].checkpoint})"
                       " have identical weights: give distinct runs.")


def inputs(spec: MergeSpec, dry_run: bool) -> tuple[list | None, dict | None]:
  """Given end points, checked, and their identities; a dry run's stand-ins if none yet."""
  if spec.seeds:
    return (_stand_ins(spec) if dry_run else None), None
  try:
    models = [runs.load_model_run(w) for w in spec.workdirs]
  except FileNotFoundError:
    if not dry_run:
      raise
    return _stand_ins(spec), {}
  check_models(models, spec)
  return models, {"endpoints": [runs.run_identity(m) for m in models]}


def trained_endpoints(spec: MergeSpec, job: runner.Job) -> list[runs.TrainedModel]:
  """The end points trained through the train task (each its own claimed run, resumable); a
  finished run of the same recipe is reused."""
  directory = spec.directory or os.path.join(job.workdir, ENDPOINTS_DIR)
  dirs = [os.path.join(directory, f"seed_{seed}") for seed in spec.seeds]
  todo = [(d, c, t) for d, c, t in zip(dirs, spec.train_configs, spec.trains)
          if runs.finished_record(d, runs.FINAL_EVAL_FILE, c) is None]
  for run_dir, cfg, _ in todo:  # every directory checked before the first is trained
    workdir_lib.check_claim(run_dir, cfg, train_task.LAYOUT, overwrite=job.overwrite,
                            vocabulary=records.VOCABULARY)
  for run_dir, cfg, train in todo:
    runner.launch_resolved(train_task, train, cfg, run_dir, overwrite=job.overwrite,
                           mesh=job.mesh)
  models = [runs.load_trained(d) for d in dirs]
  check_models(models, spec)
  return models


@dataclasses.dataclass(frozen=True)
class Setting:
  """What every merge reads: the models, their spec, the views and the statistics batches."""

  apply_fn: object
  perm_spec: align.PermutationSpec
  variables: list
  view_batches: dict
  bn_batches: dict
  renormalize: str | None
  matching: dict  # the keyword arguments of multi_align's matchings


def _setting(spec: MergeSpec, models: list, view_batches: dict, bn_batches: dict) -> Setting:
  """The models' permutation spec: written for the built-in models, else derived."""
  run = models[0]
  apply_fn = run.spec.apply_fn(run.model)
  if run.spec.name in align.WRITTEN_SPECS:
    perm_spec = align.permutation_spec(run.spec.name, run.params)
  else:
    perm_spec = symmetry.derive_spec(apply_fn, run.variables, bn_batches["image"][0])
  activation = spec.matching == "activation"
  matching = dict(matching=spec.matching, apply_fn=apply_fn if activation else None,
                  batches=list(bn_batches["image"]) if activation else None,
                  post=eval_path.ACTIVATION_SITES[spec.activation_sites], seed=spec.seed)
  return Setting(apply_fn, perm_spec, [m.variables for m in models], view_batches, bn_batches,
                 spec.path.renormalize, matching)


def aligned_params(spec: MergeSpec, ctx: Setting, method: str, n: int
                   ) -> tuple[list, dict, multi_align.MultiAlignment | None]:
  """(the first n models' params in one frame, the alignment's time and sweeps, the alignment)."""
  models = ctx.variables[:n]
  if method == "none":
    return [v["params"] for v in models], {"seconds": 0.0, "sweeps": 0}, None
  result = multi_align.align_models(ctx.perm_spec, models, method=method,
                                    max_sweeps=spec.max_sweeps, **ctx.matching)
  return ([v["params"] for v in result.aligned(ctx.perm_spec, models)],
          {"seconds": round(result.seconds, 3), "sweeps": result.sweeps}, result)


def merged_views(ctx: Setting, params: list) -> dict[str, dict[str, float]]:
  """{view: {'loss', 'accuracy'}} of the plain mean of `params` (statistics recomputed)."""
  n = len(params)
  grid = simplex.SimplexGrid(np.full((1, n), 1.0 / n), ("centroid",))
  evals = simplex.evaluate_simplex(ctx.apply_fn, params, grid, ctx.view_batches, ctx.bn_batches,
                                   renormalize=ctx.renormalize)
  return {view: ev.at("centroid") for view, ev in evals.items()}


def method_record(spec: MergeSpec, ctx: Setting, method: str) -> dict:
  """One method: the merged model at every n; the simplex, pairwise barriers and cycle
  error of all N."""
  merged, full = {}, None
  for n in sorted({*spec.sizes, spec.num_models}):
    params, timing, result = aligned_params(spec, ctx, method, n)
    if n in spec.sizes:
      merged[str(n)] = {"views": merged_views(ctx, params), "alignment": timing}
    full = (params, timing, result)
  params, timing, result = full
  simplex_evals = simplex.evaluate_simplex(ctx.apply_fn, params, spec.grid, ctx.view_batches,
                                           ctx.bn_batches, renormalize=ctx.renormalize)
  pairwise = simplex.pairwise_barriers(ctx.apply_fn, params,
                                       np.linspace(0.0, 1.0, spec.path.num_t), ctx.view_batches,
                                       ctx.bn_batches, renormalize=ctx.renormalize)
  return {
      "merged": merged, "alignment_of_all": timing,
      "cycle_error": (None if result is None else
                      multi_align.cycle_error(result.pairwise(), spec.num_models)),
      "simplex": {view: {"metrics": {k: np.asarray(v).tolist() for k, v in ev.metrics.items()},
                         "barriers": {k: v.tolist() for k, v in ev.barriers().items()},
                         "summary": ev.summary()} for view, ev in simplex_evals.items()},
      "pairwise": {view: pb.summary() for view, pb in pairwise.items()}}


def _independent(spec: MergeSpec, ctx: Setting) -> dict:
  """The cycle error of every pair matched on its own (`multi_align.pairwise_permutations`)."""
  start = time.perf_counter()
  pairwise = multi_align.pairwise_permutations(ctx.perm_spec, ctx.variables, **ctx.matching)
  return {"cycle_error": multi_align.cycle_error(pairwise, spec.num_models),
          "seconds": round(time.perf_counter() - start, 3)}


def run(spec: MergeSpec, job: runner.Job) -> dict:
  """End points (trained or given), every method x n, the simplex; returns merge.json."""
  wall = time.perf_counter()
  models = job.inputs or trained_endpoints(spec, job)
  # eval_path's views and BatchNorm batches (it reads the same fields of its spec).
  view_batches, bn_batches, provenance = eval_path.eval_data(spec, job.mesh)
  ctx = _setting(spec, models, view_batches, bn_batches)
  start = time.perf_counter()
  methods = {}
  for method in spec.methods:  # minutes each on a CPU: say when one is done
    methods[method] = method_record(spec, ctx, method)
    print(f"merge: {method} done after {time.perf_counter() - start:.0f} s", flush=True)
  record = {
      "num_models": spec.num_models, "sizes": list(spec.sizes), "matching": spec.matching,
      "endpoints": [{"checkpoint": m.checkpoint, "seed": m.config.get("seed"),
                     "views": runs.evaluate_views(ctx.apply_fn, m.variables, view_batches),
                     "identity": runs.run_identity(m)} for m in models],
      "methods": methods,
      "best_method": max(methods, key=lambda m: (  # the most accurate on clean at max n
          methods[m]["merged"][str(max(spec.sizes))]["views"]["clean"]["accuracy"])),
      "independent_pairwise": _independent(spec, ctx),
      "simplex_grid": {"labels": list(spec.grid.labels), "weights": spec.grid.weights.tolist()},
      "ts": np.linspace(0.0, 1.0, spec.path.num_t).tolist(),
      **provenance,
      "seconds": round(time.perf_counter() - start, 1),  # the merges and their evaluation
      "wall_seconds": round(time.perf_counter() - wall, 1),  # with training the end points
      "backend": jax.default_backend(), "devices": int(job.mesh.devices.size),
      "config": job.config_dict,
  }
  print(format_table(record))
  runner.write_outputs(job.workdir, {MERGE_FILE: record,
                                     MERGE_FIGURE: functools.partial(plot_merge, record)})
  return record


def _as_eval_sets(zeros: dict) -> tuple[dict, dict]:
  """A zero batch -> one eval set of one batch, and a varied BatchNorm batch (not constant)."""
  image, n = zeros["image"], zeros["label"].shape[0]
  varied = image + (jnp.arange(image.size) % 4).reshape(image.shape).astype(image.dtype)
  return ({"clean": {"image": image[None], "label": zeros["label"][None],
                     "mask": jnp.ones((1, n), jnp.float32)}}, {"image": varied[None]})


def dry_run(spec: MergeSpec, job: runner.Job) -> dict:
  """An end point's training step (when trained here) and the evaluation of one model timed;
  the estimate. One evaluated model: statistics from `path.bn_examples` examples and the four
  views; the timed call evaluates two on one batch each. Alignments are left out."""
  models, timings = job.inputs, []
  if spec.seeds:
    built = train_task.build(spec.trains[0], job.mesh)
    timings.append(runner.time_build(built, job.mesh, name="end point train step",
                                     num_steps=built.num_steps * len(spec.seeds))[1])
  apply_fn = models[0].spec.apply_fn(models[0].model)

  def point(params, sets):  # the timer's (carry, batch) -> (carry, out): two vertices
    return params, simplex.evaluate_simplex(apply_fn, params, np.eye(2), *sets,
                                            renormalize=spec.path.renormalize)

  pairs = spec.num_models * (spec.num_models - 1) // 2
  points = len(spec.methods) * (len(spec.sizes) + len(spec.grid.labels) + pairs * spec.path.num_t)
  per_model = spec.path.bn_examples + len(VIEWS) * spec.data.num_test_examples
  _, timing, sets = dry_run_lib.time_on_zero_batches(
      "evaluated model", point, [m.params for m in models[:2]], spec.data.input_shape,
      job.mesh, global_batch=max(per_model // 4, 2), num_steps=points, to_batch=_as_eval_sets)
  return dry_run_lib.report(
      f"merge: {spec.num_models} end points, sizes {list(spec.sizes)}, methods "
      f"{list(spec.methods)} ({spec.matching} matching)", job.mesh,
      {"end point params": [m.params for m in models], "eval batch": sets[0]},
      [*timings, timing])


def format_table(record: dict) -> str:
  """Method x n: the merged model's accuracy per view and the alignment's seconds; then each
  method's largest simplex error barrier per view (and where), and the cycle errors."""
  views, ends = list(record["endpoints"][0]["views"]), record["endpoints"]
  rows = [("end points (mean)", "", [np.mean([e["views"][v]["accuracy"] for e in ends])
                                     for v in views], "")]
  rows += [(m, n, [r["views"][v]["accuracy"] for v in views], f"{r['alignment']['seconds']:.2f}")
           for m, e in record["methods"].items() for n, r in e["merged"].items()]
  lines = [f"{'method':18s}{'n':>3s}" + "".join(f"{v:>10s}" for v in views) + f"{'align s':>9s}"]
  lines += [f"{m:18s}{n:>3s}" + "".join(f"{a:10.3f}" for a in accuracies) + f"{s:>9s}"
            for m, n, accuracies, s in rows]
  lines.append(f"simplex of all {record['num_models']}: largest error barrier per view (where)")
  lines += [f"  {m:16s}" + "  ".join(f"{v} {x['summary']['error']:.3f} "
                                     f"({x['summary']['error_label']})"
                                     for v, x in e["simplex"].items())
            for m, e in record["methods"].items()]
  cycles = [f", {m} {e['cycle_error']:.3f}" for m, e in record["methods"].items()
            if e["cycle_error"] is not None]
  lines.append("cycle error: independent pairwise "
               f"{record['independent_pairwise']['cycle_error']:.3f}{''.join(cycles)}")
  return "\n".join(lines)


def plot_merge(record: dict, path: str | None = None):
  """(a) Merged accuracy per view vs n, a line per method (the end points' mean dashed);
  (b) the best method's pairwise error-barrier matrix on the clean view. Returns the figure."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel  # lazily
  views = list(record["endpoints"][0]["views"])
  fig = Figure(figsize=(3.0 * (len(views) + 1), 3.2))
  axes = fig.subplots(1, len(views) + 1)
  for ax, view in zip(axes, views):
    for method, entry in record["methods"].items():
      ax.plot([int(n) for n in entry["merged"]],
              [r["views"][view]["accuracy"] for r in entry["merged"].values()], marker="o",
              label=method)
    ax.axhline(np.mean([e["views"][view]["accuracy"] for e in record["endpoints"]]),
               color="grey", linestyle="--", label="end points (mean)")
    ax.set(title=view, xlabel="n (models merged)", ylabel="accuracy", ylim=(0, 1.02),
           xticks=record["sizes"])
  axes[0].legend(fontsize=7)
  best = record["best_method"]
  matrix = np.asarray(record["methods"][best]["pairwise"]["clean"]["error"])
  image = axes[-1].imshow(matrix, cmap="viridis", vmin=0)
  axes[-1].set(title=f"{best}: pairwise error\nbarrier (clean view)", xlabel="model",
               ylabel="model", xticks=range(len(matrix)), yticks=range(len(matrix)))
  fig.colorbar(image, ax=axes[-1])
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=110)
  return fig
