"""The `reproduce` task: the paper's fine-tuning study (Table 1 and Figure 5) in one command.

`reproduce` runs the whole study for one dataset, cue and proportion: it
trains the cue model (or loads a finished train run), fine-tunes it with every
method for several seeds on a small clean set, evaluates each result on the
four views and measures the linear path from the cue model to each fine-tuned
model on cue data (the paper's Figure 5 logic: naive fine-tuning stays in the
cue model's basin, CBFT leaves it). It writes `reproduce.json` (every number),
`report.md` (the table, mean and standard deviation over seeds) and two
figures. Every piece resumes: finished runs are skipped, a killed run resumes
from its checkpoint.

Data: the clean set (`num_clean` examples, no cue) and the cue set (`num_cue`
examples, every one carrying the cue) are drawn without replacement from the
cue model's training split and are disjoint; the official code samples them
with replacement, so its clean and cue sets can overlap.
"""

import contextlib
import dataclasses
import functools
import os

import jax
import ml_collections
import numpy as np

from mechconn import barriers
from mechconn import config_checks as checks
from mechconn import dry_run as dry_run_lib
from mechconn import finetune
from mechconn import flops
from mechconn import report
from mechconn import timing
from mechconn import workdir as workdir_lib
from mechconn.tasks import data as task_data
from mechconn.tasks import finetune as finetune_task
from mechconn.tasks import methods
from mechconn.tasks import model_checks
from mechconn.tasks import records
from mechconn.tasks import runner
from mechconn.tasks import runs
from mechconn.tasks import specs
from mechconn.tasks import study_report
from mechconn.tasks import train as train_task

NAME = "reproduce"
RESULT_FILE = finetune_task.RESULT_FILE
REPRODUCE_FILE = "reproduce.json"
REPORT_FILE = "report.md"
# What each task writes (all that --overwrite may delete). The study's --overwrite
# replaces its summary; each run under runs/ is its own claimed workdir recording the
# config that produced it: kept while that config is the current one (same numbers:
# runs are deterministic), otherwise refused, or with --overwrite cleared and redone.
RUN_LAYOUT = finetune_task.LAYOUT
LAYOUT = workdir_lib.Layout(files=(REPRODUCE_FILE, REPORT_FILE, "views.png", "paths.png"))
SEED_MODES = ("auto", "sequential", "vmap")
# How the seeds of a loop method run by default, per backend: vmapped where one vmapped
# step beats separate ones (GPU, with the ensemble's convolutions as patches + matmul,
# `methods.ENSEMBLE_CONV_IMPL`), in turn where XLA makes per-seed convolutions slower grouped
# ones (CPU) or where unmeasured (TPU). Measured by benchmarks/seed_ensemble.py.
DEFAULT_SEED_MODE = {"cpu": "sequential", "gpu": "vmap", "tpu": "sequential"}


def seed_mode(mode: str) -> str:
  """'sequential' or 'vmap': `mode`, or the backend's default for 'auto'."""
  checks.check_choice(mode, SEED_MODES, "seed_mode")
  return DEFAULT_SEED_MODE.get(jax.default_backend(), "sequential") if mode == "auto" else mode


@dataclasses.dataclass(frozen=True)
class ReproduceSpec:
  """A `reproduce` config, resolved."""

  seed: int  # draws the clean and cue sets
  seeds: tuple[int, ...]  # fine-tuning seeds
  seed_mode: str
  train: train_task.TrainSpec  # the cue model's recipe
  train_config: dict  # the config it was resolved from, recorded in the cue model's workdir
  cue_model_workdir: str  # '': train the cue model in workdir/cue_model
  finetune: methods.FinetuneSpec
  eval_batch_size: int
  path: specs.PathSpec
  dry_run: bool


def resolve(config: ml_collections.ConfigDict, num_devices: int) -> ReproduceSpec:
  """A `reproduce` config, checked, and that its sets fit the cue model's training split."""
  specs.data_spec(config.train.data, NAME)  # a cue model: image data only (named first)
  if config.train.dry_run:
    raise ValueError("config.train.dry_run=True would dry-run the cue model alone; the study's "
                     "dry run is config.dry_run=True.")
  train = train_task.resolve(config.train, num_devices)
  checks.check_int(config.seed, "seed")
  checks.check_seeds(config.seeds, "seeds")
  checks.check_choice(config.seed_mode, SEED_MODES, "seed_mode")
  path = specs.path_spec(config.path)
  model_checks.check_bn_variance(path, train.model.build(), train.data.input_shape)
  ft = methods.finetune_spec(config.finetune, num_devices, tuple(config.finetune.methods))
  eval_batch = specs.eval_batch_size(config.eval_batch_size, num_devices)
  methods.check_set_sizes(ft, train.data.num_train_examples, bn_examples=path.bn_examples,
                          eval_batch_size=eval_batch)
  return ReproduceSpec(seed=config.seed, seeds=tuple(config.seeds), seed_mode=config.seed_mode,
                       train=train, train_config=workdir_lib.config_to_dict(config.train),
                       cue_model_workdir=config.cue_model_workdir, finetune=ft,
                       eval_batch_size=eval_batch, path=path, dry_run=config.dry_run)


def inputs(spec: ReproduceSpec, dry_run: bool) -> tuple[runs.TrainedModel | None, None]:
  """A given cue model (`cue_model_workdir`), loaded and checked against config.train.

  The study records its cue model per run (`_run_config`), not in its own
  config.json: a cue model it trains itself does not exist yet.
  """
  if not spec.cue_model_workdir or dry_run:
    return None, None
  given = runs.load_trained(spec.cue_model_workdir)
  runs.check_cue_model(given, spec.cue_model_workdir, spec.train_config)
  return given, None


def build(spec: ReproduceSpec, mesh: jax.sharding.Mesh,
          cue_model: runs.TrainedModel | None = None) -> dict[str, runner.Build]:
  """The study's kinds of step: the cue model's (`train.build`), and each loop method's for
  one seed (`methods.method_loop` + `build_seeds`), from `cue_model` or, when there is none
  yet, the cue model's fresh init (enough to time a step)."""
  builds = {"cue model": train_task.build(spec.train, mesh)}
  if cue_model is None:
    built = builds["cue model"]
    state = built.init_fn()
    cue_model = runs.TrainedModel(model=built.model, params=state.params,
                                  batch_stats=state.batch_stats, config={}, checkpoint="",
                                  spec=spec.train.model)
  for method in spec.finetune.methods:
    if finetune.METHODS[method].runs_loop:
      shared = methods.method_loop(method, spec.finetune, cue_model, mesh)
      builds[method] = methods.build_seeds(shared, cue_model, [cue_model.params],
                                           [spec.seeds[0]], mesh, spec.train.data.input_shape)
  return builds


def dry_run(spec: ReproduceSpec, job: runner.Job) -> dict:
  """The cue model's step and one step of each loop method, timed; the study's estimate.

  The estimate counts the cue model's steps (none with `cue_model_workdir`)
  and every loop method's steps for every seed (lp and dfr fit a head on
  cached features: seconds, left out).
  """
  builds = build(spec, job.mesh, job.inputs)
  cue_build = builds.pop("cue model")
  state, cue_timing, batch = runner.time_build(cue_build, job.mesh, name="cue model step")
  if spec.cue_model_workdir:
    cue_timing.num_steps = 0
  timings = [cue_timing]
  for method, built in builds.items():
    _, timing, _ = runner.time_build(built, job.mesh, name=f"{method} step",
                                     num_steps=built.num_steps * len(spec.seeds))
    timings.append(timing)
  return dry_run_lib.report(
      f"reproduce: {spec.train.model.name} on {spec.train.data.label}, methods "
      f"{list(spec.finetune.methods)} x seeds {list(spec.seeds)}", job.mesh,
      {"cue model state": state, "batch": batch}, timings)


def _run_config(config_dict: dict, cue_model: runs.TrainedModel, method: str,
                seeds: list[int]) -> dict:
  """What determines one run's numbers, recorded in its directory: the study's config
  without its seed and method lists and the other methods' subsections, the method, the
  seed(s), and the cue model by its recorded config and step (not its path, which moves
  with the study's directory)."""
  study = {k: v for k, v in config_dict.items() if k not in ("seeds", "dry_run", "task")}
  others = {name for m in finetune.METHODS.values() for name in m.sections} - set(
      finetune.METHODS[method].sections)
  study["finetune"] = {k: v for k, v in study["finetune"].items()
                       if k != "methods" and k not in others}
  return {"task": "reproduce run", "method": method, "seeds": list(seeds),
          "cue_model": runs.run_identity(cue_model), "study": study}


def _finished(run_dir: str, run_config: dict) -> dict | None:
  """The run's result when the directory holds one of exactly `run_config`, else None (a
  run of another config is redone: its outputs are cleared when claimed)."""
  record = runs.finished_record(run_dir, RESULT_FILE, run_config)
  # A result without a path summary: its checkpoints are reused (the loop resumes at its
  # last step) and its evaluation is redone.
  return record if record and "summary" in record["path_to_cue_model"] else None


@dataclasses.dataclass(frozen=True)
class StudyData:
  """What every run of the study reads: the sets, the views and the path's statistics."""

  clean_split: object
  cue_split: object
  view_batches: dict
  bn_batches: dict
  num_test: int


def _study_data(spec: ReproduceSpec, mesh: jax.sharding.Mesh) -> StudyData:
  """Clean and cue sets from the cue model's training split, the test views, and the fully
  cued BatchNorm examples of the paths (whatever CBFT's cue set)."""
  split, test_views, test_labels = task_data.load_data(spec.train.data)
  ft = spec.finetune
  clean_split, cue_split = task_data.split_clean_and_cue(
      split, ft.num_clean, ft.num_cue, spec.seed, ft.cbft.cue_set)
  bn_idx = np.arange(min(spec.path.bn_examples, len(cue_split)))
  bn_batches = task_data.bn_batches_of(
      cue_split.subset(bn_idx, cued=True).examples(np.arange(len(bn_idx))),
      spec.eval_batch_size)
  return StudyData(clean_split, cue_split,
                   task_data.shard_views(test_views, test_labels, spec.eval_batch_size, mesh),
                   bn_batches, len(test_labels))


def _path_record(spec: ReproduceSpec, mesh, cue_model: runs.TrainedModel, params,
                 data: StudyData) -> dict:
  """The linear path from the cue model (t = 0) to a fine-tuned model, on cue data."""
  path = jax.device_get(barriers.evaluate_path(
      cue_model.model.apply, (cue_model.params, params),
      np.linspace(0.0, 1.0, spec.path.num_t), data.view_batches["cue"],
      bn_batches=data.bn_batches, mesh=mesh, renormalize=spec.path.renormalize))
  return {"sharded_over": path.sharded_over, **runs.path_curves(path), "summary": path.summary()}


def _run_method(spec: ReproduceSpec, job: runner.Job, cue_model: runs.TrainedModel,
                method: str, todo: list[int], data: StudyData) -> dict[int, dict]:
  """{seed: result record} of one method's unfinished seeds, each claimed in its run
  directory (a vmapped group also in the group's own)."""
  together = (seed_mode(spec.seed_mode) == "vmap" and finetune.METHODS[method].runs_loop
              and len(todo) > 1)
  result_dirs = [os.path.join(job.workdir, "runs", f"{method}_seed{seed}") for seed in todo]
  with contextlib.ExitStack() as claims:
    def claim(seeds, directory):
      return claims.enter_context(runner.claimed(
          _run_config(job.config_dict, cue_model, method, seeds), directory, RUN_LAYOUT,
          job.overwrite))
    run_configs = [claim([seed], d) for seed, d in zip(todo, result_dirs)]
    run_dirs = result_dirs
    if together:
      run_dirs = [os.path.join(job.workdir, "runs", f"{method}_seeds{'-'.join(map(str, todo))}")]
      run_configs = [claim(todo, run_dirs[0])]
    outs = methods.run_method(
        method, todo, cue_model, data.clean_split, data.cue_split, data.view_batches,
        spec.finetune, run_dirs, job.mesh, ensemble=together,
        pipeline_mode=spec.train.data.pipeline, run_configs=run_configs)
    done = {}
    for seed, out, result_dir in zip(todo, outs, result_dirs):
      record = {"method": method, "seed": seed, "views": out["views"],
                "seconds": out["seconds"], "seeds_vmapped": together,
                "path_to_cue_model": _path_record(spec, job.mesh, cue_model,
                                                  out["variables"]["params"], data)}
      runner.write_outputs(result_dir, {RESULT_FILE: record})
      done[seed] = record
      print(f"{method} seed {seed}: " + ", ".join(
          f"{v} {r['accuracy']:.3f}" for v, r in out["views"].items()) +
          "; loss barrier to the cue model on cue data "
          f"{record['path_to_cue_model']['summary']['loss']:.3f}")
  return done


def _run_all(spec: ReproduceSpec, job: runner.Job, cue_model: runs.TrainedModel,
             data: StudyData) -> dict[tuple[str, int], dict]:
  """{(method, seed): result} of every method and seed. Each run directory records the
  config that produced it: a relaunch reuses a finished run of the same config; one of
  another config is refused (before any run starts) or, with --overwrite, cleared and
  redone."""
  def run_dir(method, seed):
    return os.path.join(job.workdir, "runs", f"{method}_seed{seed}")

  for method in spec.finetune.methods:
    for seed in spec.seeds:
      workdir_lib.check_claim(run_dir(method, seed),
                              _run_config(job.config_dict, cue_model, method, [seed]),
                              RUN_LAYOUT, overwrite=job.overwrite,
                              vocabulary=records.VOCABULARY)
  finished = {}
  for method in spec.finetune.methods:
    todo = []
    for seed in spec.seeds:
      done = _finished(run_dir(method, seed),
                       _run_config(job.config_dict, cue_model, method, [seed]))
      if done is None:
        todo.append(seed)
      else:
        finished[(method, seed)] = done
    if todo:
      finished.update({(method, seed): record for seed, record in
                       _run_method(spec, job, cue_model, method, todo, data).items()})
  return finished


def _table(spec: ReproduceSpec, finished: dict) -> dict:
  """{method: views (mean, std over seeds), barriers to the cue model, mean path loss}."""
  table = {}
  for method in spec.finetune.methods:
    recs = [finished[(method, s)] for s in spec.seeds]
    table[method] = {
        "views": {v: _mean_std([r["views"][v]["accuracy"] for r in recs])
                  for v in recs[0]["views"]},
        "loss_barrier_to_cue_model": _mean_std(
            [r["path_to_cue_model"]["summary"]["loss"] for r in recs]),
        "error_barrier_to_cue_model": _mean_std(
            [r["path_to_cue_model"]["summary"]["error"] for r in recs]),
        "path_loss_mean": np.mean([r["path_to_cue_model"]["loss"] for r in recs], 0).tolist()}
  return table


def run(spec: ReproduceSpec, job: runner.Job) -> dict:
  """Cue model, every method x seed, views table, path barriers; returns reproduce.json.

  Its 'wall_time' says where the seconds went, from the launch (`timing`): training steps,
  compilation, evaluation, path evaluation, data, checkpoints, outputs, startup, other.
  """
  with timing.recording(since_launch=True) as clock:
    record, figures = _study(spec, job)
    runner.write_outputs(job.workdir, figures)
    with timing.phase("matmul peak"):  # the machine, for the wall time's reader
      record["machine"] = {**timing.machine(), "matmul_gflops_float32": round(
          flops.matmul_peak_flops(repeats=3) / 1e9, 1)}
  record["wall_time"] = clock.breakdown()
  record["wall_seconds"] = record["wall_time"]["wall_seconds"]
  runner.write_outputs(job.workdir, {REPRODUCE_FILE: record,
                                     REPORT_FILE: study_report.format_report(record)})
  print(study_report.format_table(record))
  print(f"Wall time {record['wall_seconds']:.0f} s:\n" + timing.format_breakdown(
      record["wall_time"]))
  return record


def _study(spec: ReproduceSpec, job: runner.Job) -> tuple[dict, dict]:
  """The study's record (without its wall time) and its figures (name: writer)."""
  # 1. The cue model: a finished train run, or trained here (resumable).
  cue_dir = spec.cue_model_workdir or os.path.join(job.workdir, "cue_model")
  if job.inputs is None:
    runner.launch_resolved(train_task, spec.train, spec.train_config, cue_dir,
                           overwrite=job.overwrite, mesh=job.mesh)
  with timing.phase(timing.CHECKPOINTS):
    cue_model = job.inputs or runs.load_trained(cue_dir)
  # 2. Data; 3. every method and seed; 4. the record, the report and the figures.
  data = _study_data(spec, job.mesh)
  finished = _run_all(spec, job, cue_model, data)
  recorded_data = cue_model.config["data"]
  record = {
      "cue_model": {"workdir": os.path.abspath(cue_dir), "checkpoint": cue_model.checkpoint,
                    "views": runs.evaluate_views(cue_model.model.apply, cue_model.variables,
                                                 data.view_batches)},
      "methods": _table(spec, finished),
      "seeds": list(spec.seeds),
      "ts": np.linspace(0.0, 1.0, spec.path.num_t).tolist(),
      # What the cue model was trained on, from its own run record (checked against
      # config.train before the study started), so the report states what ran.
      "data": {"dataset": recorded_data["dataset"], "cue": recorded_data["cue"],
               "cue_proportion_of_cue_model": recorded_data["cue_proportion"],
               "num_clean": len(data.clean_split), "num_cue": len(data.cue_split),
               "num_cue_cued": int(np.sum(data.cue_split.has_cue)),
               "test_cue_proportion": spec.train.data.test_cue_proportion,
               "num_test_per_view": int(data.num_test),
               "path_eval": "cue view of the test split",
               "path_batchnorm": f"{np.prod(data.bn_batches['image'].shape[:2])}"
                                 " cue training examples"},
      "backend": jax.default_backend(),
      "devices": int(job.mesh.devices.size),
      "config": job.config_dict,
  }
  return record, {
      "views.png": functools.partial(report.plot_finetune_views, record),
      "paths.png": functools.partial(report.plot_finetune_paths, {  # every seed's path
          m: [finished[(m, s)]["path_to_cue_model"] for s in spec.seeds]
          for m in spec.finetune.methods}, ts=record["ts"])}


def _mean_std(values: list[float]) -> dict:
  return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
