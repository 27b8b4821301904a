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
import functools
import json
import os
import time
from typing import Any

import jax
import numpy as np

from mechconn import barriers
from mechconn import config_checks as checks
from mechconn import dry_run as dry_run_lib
from mechconn import finetune
from mechconn import report
from mechconn import workdir as workdir_lib
from mechconn.tasks import config as task_config
from mechconn.tasks import data as task_data
from mechconn.tasks import finetune as finetune_task
from mechconn.tasks import runner
from mechconn.tasks import runs
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
# How `reproduce` runs the seeds of a loop method, from benchmarks/seed_ensemble.py
# (3 seeds, batch 128 each; speed of one vmapped step against three separate ones):
#   - 2-core CPU: 0.52-0.78x (XLA:CPU turns per-seed convolutions into slower grouped
#     ones): seeds in turn;
#   - one H200 (jax 0.11.2): with cuDNN convolutions 0.29-0.58x (grouped convolutions
#     again), but with the ensemble's convolutions as patches + matmul
#     (`finetune.ENSEMBLE_CONV_IMPL`, batched matmuls) 1.11-1.69x for SmallCNN(32) and
#     VGG13, naive and CBFT: vmap. (The README's main job is too small to tell there:
#     84 s from launch to report with vmapped seeds, each method's seconds per seed
#     within 0.4 s of seeds in turn.)
#   - TPU: unmeasured; seeds in turn, the reference.
DEFAULT_SEED_MODE = {"cpu": "sequential", "gpu": "vmap", "tpu": "sequential"}


def seed_mode(mode: str) -> str:
  """'sequential' or 'vmap': `mode`, or the backend's default for 'auto'."""
  checks.check_choice(mode, SEED_MODES, "seed_mode")
  return DEFAULT_SEED_MODE.get(jax.default_backend(), "sequential") if mode == "auto" else mode


def check(config: Any, num_devices: int) -> None:
  """Validates a `reproduce` config, and that its sets fit the cue model's training split."""
  task_config.check_data_config(config.train.data, task=NAME)  # image data: a cue model
  train_task.check(config.train, num_devices)
  finetune_task.check_finetune_config(config, num_devices)
  checks.check_seeds(config.seeds, "seeds")
  checks.check_choice(config.seed_mode, SEED_MODES, "seed_mode")
  checks.check_int(config.path.num_t, "path.num_t", minimum=2)
  checks.check_positive_int(config.path.bn_examples, "path.bn_examples")
  task_config.check_bn_variance(
      config.path, runs.model_of(config.train.model, config.train.data.dataset),
      task_config.input_shape(config.train.data))
  finetune_task.check_set_sizes(config.finetune,
                                task_config.num_train_examples(config.train.data),
                                tuple(config.finetune.methods),
                                bn_examples=config.path.bn_examples,
                                eval_batch_size=config.eval_batch_size)


# The fields of a cue model's train config that the study's statements depend on.
CUE_MODEL_FIELDS = ("data.dataset", "data.cue", "data.cue_proportion", "data.num_train",
                    "data.seed", "model.")


def check_cue_model(cue_model: runs.TrainedModel, workdir: str, train_config: Any) -> None:
  """Raises unless a given cue model was trained with `train_config`'s data and model.

  Compares dataset, cue kind and proportion, training set size, data seed
  (and the simple dataset of Dominoes), model name and attributes.
  """
  recorded = workdir_lib.flatten(cue_model.config)
  expected = workdir_lib.flatten(workdir_lib.config_to_dict(train_config))
  fields = CUE_MODEL_FIELDS + (("data.simple_dataset",) if expected["data.cue"] == "dominoes"
                               else ())
  keys = sorted(k for k in set(recorded) | set(expected)
                if any(k == f or (f.endswith(".") and k.startswith(f)) for f in fields))
  diff = workdir_lib.config_differences(  # fields added since compare as what old runs did
      {k: recorded[k] for k in keys if k in recorded}, {k: expected[k] for k in keys
                                                         if k in expected})
  if diff:
    raise ValueError(
        f"config.cue_model_workdir={workdir!r} holds a model trained with "
        + ", ".join(f"{k}={recorded.get(k)!r}" for k in diff) + " but config.train has "
        + ", ".join(f"{k}={expected.get(k)!r}" for k in diff)
        + ". Set config.train to the cue model's recipe (e.g. --config.train."
        f"{diff[0]}={recorded.get(diff[0])!r}), or give a cue model trained with this one.")


def inputs(config: Any, dry_run: bool) -> tuple[runs.TrainedModel | None, None]:
  """A given cue model (`cue_model_workdir`), loaded and checked against config.train.

  The study records its cue model per run (`_run_config`), not in its own
  config.json: a cue model it trains itself does not exist yet.
  """
  if not config.cue_model_workdir or dry_run:
    return None, None
  given = runs.load_trained(config.cue_model_workdir)
  check_cue_model(given, config.cue_model_workdir, config.train)
  return given, None


def build(config: Any, mesh: jax.sharding.Mesh, cue_model: runs.TrainedModel | None = None
          ) -> dict[str, runner.Build]:
  """The study's kinds of step: the cue model's (`train.build`), and each loop method's for
  one seed (`finetune.method_loop` + `build_seeds`), from `cue_model` or, when there is none
  yet, the cue model's fresh init (enough to time a step)."""
  builds = {"cue model": train_task.build(config.train, mesh)}
  if cue_model is None:
    built = builds["cue model"]
    state = built.init_fn()
    cue_model = runs.TrainedModel(model=built.model, params=state.params,
                                  batch_stats=state.batch_stats, config={}, checkpoint="")
  image_shape = task_config.input_shape(config.train.data)
  for method in config.finetune.methods:
    if finetune.METHODS[method].runs_loop:
      shared = finetune_task.method_loop(method, config.finetune, cue_model,
                                         config.finetune.num_clean, mesh)
      builds[method] = finetune_task.build_seeds(shared, cue_model, [cue_model.params],
                                                 [config.seeds[0]], mesh, image_shape)
  return builds


def dry_run(config: Any, mesh: jax.sharding.Mesh, cue_model: Any) -> dict:
  """The cue model's step and one step of each loop method, timed; the study's estimate.

  The estimate counts the cue model's steps (none with `cue_model_workdir`)
  and every loop method's steps for every seed (lp and dfr fit a head on
  cached features: seconds, left out).
  """
  builds = build(config, mesh, cue_model)
  cue_build = builds.pop("cue model")
  state, cue_timing, batch = runner.time_build(cue_build, mesh, name="cue model step")
  if config.cue_model_workdir:
    cue_timing.num_steps = 0
  timings = [cue_timing]
  for method, built in builds.items():
    _, timing, _ = runner.time_build(built, mesh, name=f"{method} step",
                                     num_steps=built.num_steps * len(config.seeds))
    timings.append(timing)
  data = config.train.data
  return dry_run_lib.report(
      f"reproduce: {config.train.model.name} on {data.dataset} ({data.cue}, "
      f"p={data.cue_proportion}), methods {list(config.finetune.methods)} x seeds "
      f"{list(config.seeds)}", mesh, {"cue model state": state, "batch": batch}, timings)


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
  """The run's result when the directory holds one of exactly `run_config`, else None."""
  result_path = os.path.join(run_dir, RESULT_FILE)
  config_path = os.path.join(run_dir, workdir_lib.CONFIG_FILE)
  if not (os.path.exists(result_path) and os.path.exists(config_path)):
    return None
  with open(config_path) as f:
    recorded = json.load(f)
  if workdir_lib.config_differences(recorded, run_config):
    return None  # a run of another config: redone (its outputs are cleared when claimed)
  with open(result_path) as f:
    record = json.load(f)
  # A run recorded before path summaries had their present form: its checkpoints are
  # reused (the loop resumes at its last step) and its evaluation is redone.
  return record if "summary" in record["path_to_cue_model"] else None


def run(config: Any, workdir: str, mesh: jax.sharding.Mesh, given: runs.TrainedModel | None,
        config_dict: dict, *, overwrite: bool = False) -> dict:
  """Cue model, every method x seed, views table, path barriers; returns reproduce.json."""
  ensemble = seed_mode(config.seed_mode) == "vmap"
  wall = time.perf_counter()

  # 1. The cue model: a finished train run, or trained here (resumable).
  cue_dir = config.cue_model_workdir or os.path.join(workdir, "cue_model")
  if given is None:
    runner.launch(train_task, config.train, cue_dir, overwrite=overwrite)
  cue_model = given or runs.load_trained(cue_dir)

  # 2. Data: clean and cue sets from the cue model's training split; test views.
  split, test_views, test_labels = task_data.load_data(config.train.data)
  ft = config.finetune
  clean_split, cue_split = task_data.split_clean_and_cue(
      split, ft.num_clean, ft.num_cue, config.seed, task_data.cue_set_of(ft))
  view_batches = task_data.shard_views(test_views, test_labels, config.eval_batch_size, mesh)
  bn_idx = np.arange(min(config.path.bn_examples, len(cue_split)))
  bn_batches = task_data.bn_batches_of(  # fully cued whatever CBFT's cue set
      cue_split.subset(bn_idx, cued=True).examples(np.arange(len(bn_idx))),
      config.eval_batch_size)
  ts = np.linspace(0.0, 1.0, config.path.num_t)

  # 3. Every method and seed. Each run directory records the config that produced it;
  #    a relaunch reuses a finished run of the same config; one of another config is
  #    refused (before any run starts) or, with --overwrite, cleared and redone.
  for method in ft.methods:
    for seed in config.seeds:
      workdir_lib.check_claim(os.path.join(workdir, "runs", f"{method}_seed{seed}"),
                              _run_config(config_dict, cue_model, method, [seed]), RUN_LAYOUT,
                              overwrite=overwrite)
  finished = {}
  for method in ft.methods:
    todo = []
    for seed in config.seeds:
      run_dir = os.path.join(workdir, "runs", f"{method}_seed{seed}")
      done = _finished(run_dir, _run_config(config_dict, cue_model, method, [seed]))
      if done is None:
        todo.append(seed)
      else:
        finished[(method, seed)] = done
    if not todo:
      continue
    together = ensemble and finetune.METHODS[method].runs_loop and len(todo) > 1
    result_dirs = [os.path.join(workdir, "runs", f"{method}_seed{seed}") for seed in todo]
    with contextlib.ExitStack() as claims:
      # A run directory of another config is refused, or with --overwrite cleared.
      run_configs = [claims.enter_context(runner.claimed(
          _run_config(config_dict, cue_model, method, [seed]), d, RUN_LAYOUT, overwrite))
                     for seed, d in zip(todo, result_dirs)]
      run_dirs = result_dirs
      if together:
        run_dirs = [os.path.join(workdir, "runs", f"{method}_seeds{'-'.join(map(str, todo))}")]
        run_configs = [claims.enter_context(runner.claimed(
            _run_config(config_dict, cue_model, method, todo), run_dirs[0], RUN_LAYOUT,
            overwrite))]
      outs = finetune_task.run_method(
          method, todo, cue_model, clean_split, cue_split, view_batches, ft, run_dirs, mesh,
          ensemble=together, pipeline_mode=config.train.data.get("pipeline", "auto"),
          run_configs=run_configs)
      for seed, out, result_dir in zip(todo, outs, result_dirs):
        # The linear path from the cue model (t = 0) to the fine-tuned model, on cue data.
        path = jax.device_get(barriers.evaluate_path(
            cue_model.model.apply, (cue_model.params, out["variables"]["params"]), ts,
            view_batches["cue"], bn_batches=bn_batches, mesh=mesh,
            renormalize=task_config.renormalize_of(config.path)))
        record = {"method": method, "seed": seed, "views": out["views"],
                  "seconds": out["seconds"], "seeds_vmapped": together,
                  "path_to_cue_model": {
                      "sharded_over": path.sharded_over,
                      "loss": np.asarray(path.loss).tolist(),
                      "accuracy": np.asarray(path.accuracy).tolist(),
                      "summary": path.summary()}}
        runner.write_outputs(result_dir, {RESULT_FILE: record})
        finished[(method, seed)] = record
        print(f"{method} seed {seed}: " + ", ".join(
            f"{v} {r['accuracy']:.3f}" for v, r in out["views"].items()) +
            "; loss barrier to the cue model on cue data "
            f"{record['path_to_cue_model']['summary']['loss']:.3f}")

  # 4. Aggregate, write the JSON, the report and the figures.
  table = {}
  for method in ft.methods:
    recs = [finished[(method, s)] for s in config.seeds]
    table[method] = {
        "views": {v: _mean_std([r["views"][v]["accuracy"] for r in recs])
                  for v in recs[0]["views"]},
        "loss_barrier_to_cue_model": _mean_std(
            [r["path_to_cue_model"]["summary"]["loss"] for r in recs]),
        "error_barrier_to_cue_model": _mean_std(
            [r["path_to_cue_model"]["summary"]["error"] for r in recs]),
        "path_loss_mean": np.mean([r["path_to_cue_model"]["loss"] for r in recs], 0).tolist()}
  record = {
      "cue_model": {"workdir": os.path.abspath(cue_dir), "checkpoint": cue_model.checkpoint,
                    "views": runs.evaluate_views(cue_model.model.apply, cue_model.variables,
                                                 view_batches)},
      "methods": table,
      "seeds": list(config.seeds),
      "ts": ts.tolist(),
      # What the cue model was trained on, from its own run record (checked against
      # config.train before the study started), so the report states what ran.
      "data": {"dataset": cue_model.config["data"]["dataset"],
               "cue": cue_model.config["data"]["cue"],
               "cue_proportion_of_cue_model": cue_model.config["data"]["cue_proportion"],
               "num_clean": len(clean_split), "num_cue": len(cue_split),
               "num_cue_cued": int(np.sum(cue_split.has_cue)),
               "test_cue_proportion": task_data.test_cue_proportion(config.train.data),
               "num_test_per_view": int(len(test_labels)),
               "path_eval": "cue view of the test split",
               "path_batchnorm": f"{bn_batches['image'].shape[0] * bn_batches['image'].shape[1]}"
                                 " cue training examples"},
      "wall_seconds": round(time.perf_counter() - wall, 1),
      "backend": jax.default_backend(),
      "devices": int(mesh.devices.size),
      "config": config_dict,
  }
  runner.write_outputs(workdir, {
      REPRODUCE_FILE: record, REPORT_FILE: format_report(record),
      "views.png": functools.partial(report.plot_finetune_views, record),
      "paths.png": functools.partial(report.plot_finetune_paths, record)})
  print(format_table(record))
  return record


def _mean_std(values: list[float]) -> dict:
  return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}


def format_table(record: dict) -> str:
  """Markdown: method x view accuracy (mean +- std over seeds) and the path barrier."""
  views = list(record["cue_model"]["views"])
  lines = ["| method | " + " | ".join(views) + " | loss barrier to cue model (cue data) |",
           "|---" * (len(views) + 2) + "|"]
  lines.append("| cue model | " + " | ".join(
      f"{record['cue_model']['views'][v]['accuracy']:.3f}" for v in views) + " | - |")
  for method, row in record["methods"].items():
    cells = [f"{row['views'][v]['mean']:.3f} +- {row['views'][v]['std']:.3f}" for v in views]
    b = row["loss_barrier_to_cue_model"]
    lines.append(f"| {method} | " + " | ".join(cells) + f" | {b['mean']:.3f} +- {b['std']:.3f} |")
  return "\n".join(lines)


def _test_cue_text(proportion: float) -> str:
  return ("" if proportion == 1.0 else
          f" (the cue, rand_cue and rand_img views treat the first {proportion:.0%} of each "
          "class, as the official fine-tuning script's test loaders)")


def format_report(record: dict) -> str:
  data = record["data"]
  return (f"# Fine-tuning study: {data['dataset']}, {data['cue']} cue on "
          f"{data['cue_proportion_of_cue_model']:.0%} of the cue model's training data\n\n"
          f"Test accuracy per view (mean +- std over seeds {record['seeds']}); the last column "
          f"is the loss barrier of the linear path from the cue model to the fine-tuned model, "
          f"on the cue view ({data['path_batchnorm']} for BatchNorm at each t).\n\n"
          f"{format_table(record)}\n\n"
          f"Fine-tuned on {data['num_clean']} clean examples (CBFT also on {data['num_cue']} "
          f"examples, {data.get('num_cue_cued', data['num_cue'])} of them cued, disjoint); "
          f"{data['num_test_per_view']} test examples per view"
          f"{_test_cue_text(data.get('test_cue_proportion', 1.0))}. "
          f"Wall time {record['wall_seconds']:.0f} s on {record['backend']} "
          f"({record['devices']} device(s)).\n\n"
          "![view accuracies](views.png)\n\n![paths from the cue model](paths.png)\n")
