"""The paper's connectivity analysis as two tasks: `fit_curve` and `eval_path`.

Between a cue model (t = 0) and a no-cue model (t = 1), both finished `train`
runs:
  - `fit_curve` fits the free control point(s) of a Bezier curve (or a
    polygonal chain) on a chosen dataset (e.g. clean data, or cue data at
    proportion 1), checkpointed and resumable like training;
  - `eval_path` evaluates the linear path (LMC), the linear path after
    permutation alignment (LMC-P) and every fitted curve (QMC) on the four
    counterfactual views, with BatchNorm statistics recomputed at each t,
    and writes `eval_path.json` (curves, barriers per view with the t of each
    maximum, the Definition 5 verdict, and what produced them) and
    `eval_path.png` (accuracy along t, one panel per path, one line per view).
"""

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mechconn import align
from mechconn import barriers
from mechconn import checkpoint
from mechconn import config_checks as checks
from mechconn import counterfactual
from mechconn import curves
from mechconn import dry_run as dry_run_lib
from mechconn import mesh as mesh_lib
from mechconn import report
from mechconn import train
from mechconn import workdir as workdir_lib
from mechconn.data import batching
from mechconn.data import datasets
from mechconn.data import pipeline
from mechconn.data.views import VIEWS
from mechconn.models import get_model

CURVE_FILE = "curve.json"
EVAL_PATH_FILE = "eval_path.json"
EVAL_PATH_FIGURE = "eval_path.png"
ALIGNMENTS = ("none", "weight", "activation")
CURVE_LAYOUT = dataclasses.replace(train.LOOP_LAYOUT,
                                   files=train.LOOP_LAYOUT.files + (CURVE_FILE,))
EVAL_PATH_LAYOUT = workdir_lib.Layout(files=(EVAL_PATH_FILE, EVAL_PATH_FIGURE))
BN_DATA = ("clean", "train")


def _check_endpoints(start: train.TrainedModel, end: train.TrainedModel, data: Any) -> None:
  """The end points share one model, and were trained on this config's dataset and views."""
  for key in ("name", "kwargs"):
    if start.config["model"][key] != end.config["model"][key]:
      raise ValueError(f"The end points' models differ in model.{key}: "
                       f"{start.config['model'][key]!r} vs {end.config['model'][key]!r}.")
  def views(cue):  # cue 'none' (plain data) is evaluated on box views
    return "box" if cue == "none" else cue

  keys = ("dataset", "cue") + (("simple_dataset",) if data.cue == "dominoes" else ())
  for run in (start, end):
    recorded = run.config["data"]
    for key in keys:
      same = (views(recorded[key]) == views(data[key]) if key == "cue"
              else recorded[key] == data[key])
      if not same:
        raise ValueError(f"The end point {run.checkpoint} was trained with data.{key}="
                         f"{recorded[key]!r} but this config has config.data.{key}="
                         f"{data[key]!r}; set it to match, or use end points trained on it.")


def check_curve_config(config: Any, num_devices: int) -> None:
  """Validates a `fit_curve` config before any work (ValueError naming the key)."""
  checks.check_int(config.seed, "seed")
  train.check_data_config(config.data)
  train.check_model_config(config.endpoint_model, "endpoint_model")
  train.check_optimization_config(config, num_devices)
  checks.check_choice(config.curve.kind, curves.CURVE_KINDS, "curve.kind")
  checks.check_choice(config.curve.init, curves.INITS, "curve.init")
  checks.check_positive_int(config.curve.num_free, "curve.num_free")
  for key in ("start_workdir", "end_workdir"):
    if not config[key]:
      raise ValueError(f"config.{key} is empty: give the workdir of a finished train run.")
  train.steps_of(config, dry_run_lib.num_train_examples(config.data))


def _dry_run_endpoints(config: Any) -> tuple[Any, Any, str]:
  """(start, end) TrainedModel-likes for a dry run and where they came from.

  The finished train runs when both exist; otherwise fresh inits of
  `config.endpoint_model` (a dry run may come before the end points).
  """
  try:
    start, end = (train.load_trained(w) for w in (config.start_workdir, config.end_workdir))
    return start, end, "the end points' train runs"
  except FileNotFoundError:
    pass
  model = get_model(config.endpoint_model.name, datasets.NUM_CLASSES[config.data.dataset],
                    **config.endpoint_model.kwargs)
  sample = jnp.zeros((1, *dry_run_lib.image_shape(config.data)), jnp.float32)
  runs = []
  for seed in (0, 1):
    variables = model.init(jax.random.key(seed), sample)
    runs.append(train.TrainedModel(model=model, params=variables["params"],
                                   batch_stats=variables.get("batch_stats", {}), config={},
                                   checkpoint=""))
  return runs[0], runs[1], "fresh inits (the end points' runs are not there yet)"


def dry_run_fit_curve(config: Any) -> dict:
  """The fit_curve task's dry run: one timed curve step, the fit's estimate."""
  mesh = mesh_lib.data_mesh()
  check_curve_config(config, mesh.devices.size)
  start_run, end_run, source = _dry_run_endpoints(config)
  steps_per_epoch, num_steps = train.steps_of(config,
                                              dry_run_lib.num_train_examples(config.data))
  tx, _ = train.make_optimizer(config.optimizer, num_steps=num_steps,
                               steps_per_epoch=steps_per_epoch)
  model = start_run.model
  loss_fn = mesh_lib.replicate(
      curves.CurveLoss(model.apply, config.curve.kind, start_run.params, end_run.params,
                       start_run.batch_stats), mesh)
  free = curves.init_free_points(loss_fn.start, loss_fn.end, config.curve.num_free, "linear")
  state = mesh_lib.replicate(train.TrainState(step=jnp.zeros((), jnp.int32), params=free,
                                              batch_stats={}, opt_state=tx.init(free)), mesh)
  step = functools.partial(train.train_step, root_key=mesh_lib.replicate(jax.random.key(0), mesh),
                           loss_fn=loss_fn, tx=tx)
  state, timing, batch = dry_run_lib.time_on_zero_batches(
      "curve step", step, state, config.data, mesh, global_batch=config.batch_size,
      num_steps=num_steps)
  return dry_run_lib.report(
      f"fit_curve: {config.curve.kind} with {config.curve.num_free} free point(s) of "
      f"{type(model).__name__} on {config.data.dataset} (p={config.data.cue_proportion}); "
      f"end points: {source}", mesh, {"curve state": state, "batch": batch}, [timing])


def fit_curve(config: Any, workdir: str, *, overwrite: bool = False) -> dict:
  """Fits a curve between two trained models; writes checkpoints and curve.json.

  Returns:
    The curve.json record (the curve's provenance and its final fit metrics).
  """
  if config.get("dry_run", False):
    return dry_run_fit_curve(config)
  mesh = mesh_lib.data_mesh()
  check_curve_config(config, mesh.devices.size)
  start_run = train.load_trained(config.start_workdir)
  end_run = train.load_trained(config.end_workdir)
  _check_endpoints(start_run, end_run, config.data)
  inputs = {"start": train.run_identity(start_run), "end": train.run_identity(end_run)}
  with train.claimed(config, workdir, CURVE_LAYOUT, overwrite, inputs=inputs) as config_dict:
    return _fit_curve(config, workdir, mesh, config_dict, start_run, end_run)


def _fit_curve(config, workdir, mesh, config_dict, start_run, end_run) -> dict:
  split, test_views, _ = train.load_data(config.data)
  steps_per_epoch, num_steps = train.steps_of(config, len(split))
  tx, schedule = train.make_optimizer(config.optimizer, num_steps=num_steps,
                                      steps_per_epoch=steps_per_epoch)
  model = start_run.model
  replicated = mesh_lib.replicated(mesh)
  loss_fn = mesh_lib.replicate(
      curves.CurveLoss(model.apply, config.curve.kind, start_run.params, end_run.params,
                       start_run.batch_stats), mesh)
  root = jax.random.key(config.seed)
  init_key, step_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
  sample = jnp.zeros((1,) + test_views["clean"].shape[1:], jnp.float32)

  def init_fn():
    fresh = [model.init(jax.random.fold_in(init_key, k), sample)["params"]
             for k in range(config.curve.num_free)]
    free = curves.init_free_points(loss_fn.start, loss_fn.end, config.curve.num_free,
                                   config.curve.init, fresh)
    return train.TrainState(step=jnp.zeros((), jnp.int32), params=free, batch_stats={},
                            opt_state=tx.init(free))

  step_fn = functools.partial(train.train_step, root_key=jax.device_put(step_key, replicated),
                              loss_fn=loss_fn, tx=tx)
  start = time.perf_counter()
  state = train.train_loop(
      init_fn, step_fn, train.batch_fn_for(split, config.batch_size, config.seed, mesh),
      workdir, train.loop_options(config, num_steps, steps_per_epoch,
                                  f"fit {config.curve.kind}"),
      mesh=mesh, learning_rate_fn=schedule, examples_per_step=config.batch_size)
  last = [r for r in workdir_lib.read_metrics(os.path.join(workdir, workdir_lib.METRICS_FILE))
          if "train/loss" in r]
  record = {
      "kind": config.curve.kind,
      "num_free": config.curve.num_free,
      "step": int(state.step),
      "start_checkpoint": start_run.checkpoint,
      "end_checkpoint": end_run.checkpoint,
      "fit_data": {"dataset": config.data.dataset, "cue": config.data.cue,
                   "cue_proportion": config.data.cue_proportion, "num_train": len(split)},
      "final_train_loss": last[-1]["train/loss"] if last else None,
      "seconds_this_session": round(time.perf_counter() - start, 1),
      "config": config_dict,
  }
  if jax.process_index() == 0:
    workdir_lib.write_json_atomic(os.path.join(workdir, CURVE_FILE), record)
  print(f"fitted a {config.curve.kind} curve ({config.curve.num_free} free point(s)) on "
        f"{config.data.dataset} p={config.data.cue_proportion}; last train loss "
        f"{record['final_train_loss']:.4f}")
  return record


def _check_curve_ends(record: dict, workdir: str, ends: dict, start_run, end_run) -> dict:
  """The curve's recorded config; raises unless it was fitted between exactly these end points.

  Compares the end points' recorded configs and steps (what the curve's
  config.json holds under 'inputs'): a path alone does not tell a model
  retrained in place from the one the curve was fitted to.
  """
  with open(os.path.join(workdir, workdir_lib.CONFIG_FILE)) as f:
    curve_config = json.load(f)
  recorded = curve_config.get("inputs")
  if recorded is None:  # fitted before curves recorded their end points: paths only
    same = (record["start_checkpoint"], record["end_checkpoint"]) == (start_run.checkpoint,
                                                                      end_run.checkpoint)
    diff = [] if same else ["start/end checkpoint paths"]
  else:
    diff = workdir_lib.config_differences({k: recorded.get(k) for k in ends}, ends)
  if diff:
    raise ValueError(f"The curve in {workdir} was fitted between other end points than this "
                     f"config's {start_run.checkpoint} and {end_run.checkpoint} (they differ in "
                     f"{diff[:5]}): an end point was retrained or replaced since. Refit the "
                     "curve.")
  return curve_config


def load_curve(workdir: str) -> tuple[dict, tuple]:
  """(curve.json record, free control points) of a finished fit_curve run."""
  path = os.path.join(workdir, CURVE_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} holds no finished fit_curve run (no {CURVE_FILE}); "
                            "run or resume the fit_curve task there first.")
  with open(path) as f:
    record = json.load(f)
  state = checkpoint.Checkpointer(os.path.join(workdir, train.CHECKPOINT_DIR)).read(
      record["step"])
  free = tuple(state["params"][str(k)] for k in range(record["num_free"]))
  return record, free


def curve_label(record: dict) -> str:
  """'bezier (fit on clean data)' or 'bezier (fit on cue data, p=1.0)'."""
  data = record["fit_data"]
  on = ("clean data" if data["cue_proportion"] == 0 else
        f"{data['cue']} data, p={data['cue_proportion']}")
  return f"{record['kind']} (fit on {on})"


def check_eval_path_config(config: Any, num_devices: int) -> None:
  """Validates an `eval_path` config before any work (ValueError naming the key)."""
  checks.check_int(config.seed, "seed")
  train.check_data_config(config.data)
  train.check_model_config(config.endpoint_model, "endpoint_model")
  checks.check_choice(config.align, ALIGNMENTS, "align")
  checks.check_choice(config.bn.data, BN_DATA, "bn.data")
  checks.check_positive_int(config.bn.num_examples, "bn.num_examples")
  checks.check_int(config.num_t, "num_t", minimum=2)
  checks.check_positive_int(config.eval_batch_size, "eval_batch_size")
  mesh_lib.check_batch_size(config.eval_batch_size, num_devices, "config.eval_batch_size")
  if config.bn.num_examples < config.eval_batch_size:
    raise ValueError(f"config.bn.num_examples={config.bn.num_examples} makes no full batch "
                     f"of eval_batch_size={config.eval_batch_size}.")
  if config.bn.num_examples > dry_run_lib.num_train_examples(config.data):
    raise ValueError(f"config.bn.num_examples={config.bn.num_examples} exceeds the "
                     f"{dry_run_lib.num_train_examples(config.data)} training examples.")
  checks.check_choice(config.barrier_metric, ("error", "loss"), "barrier_metric")
  checks.check_number(config.barrier_tolerance, "barrier_tolerance", low=0.0)
  checks.check_int(config.get("per_device_batch_size", 0), "per_device_batch_size",
                   hint=" (unused by eval_path: it sets eval_batch_size)")
  for i, w in enumerate(config.curve_workdirs):
    if not w:
      raise ValueError(f"config.curve_workdirs[{i}] is empty: give a finished fit_curve run.")


def dry_run_eval_path(config: Any) -> dict:
  """The eval_path task's dry run: one t of a path timed, the evaluation's estimate.

  A "step" is one t: BatchNorm statistics from `bn.num_examples` examples and
  the four views of the test split; the timed one uses one batch of each. The
  estimate leaves out the alignment (seconds for weight matching).
  """
  mesh = mesh_lib.data_mesh()
  check_eval_path_config(config, mesh.devices.size)
  start_run, end_run, source = _dry_run_endpoints(config)
  model = start_run.model
  points = (start_run.params, end_run.params)

  def as_eval_sets(zeros):  # one eval batch, and one BatchNorm batch of the same size
    n = zeros["label"].shape[0]
    return ({"clean": {"image": zeros["image"][None], "label": zeros["label"][None],
                       "mask": jnp.ones((1, n), jnp.float32)}}, {"image": zeros["image"][None]})

  def two_ts(state, sets):  # ts (0, 1), the shortest grid: two points
    eval_sets, bn_batches = sets
    return state, barriers.evaluate_path_sets(model.apply, points, np.linspace(0, 1, 2),
                                              eval_sets, bn_batches=bn_batches, mesh=mesh)

  # A "step" is one t: BatchNorm statistics from bn.num_examples examples plus the four
  # views, i.e. bn.num_examples + 4 x num_test examples; two_ts at batch n does 2 x 2n.
  examples_per_t = config.bn.num_examples + len(VIEWS) * dry_run_lib.num_test_examples(
      config.data)
  num_paths = 1 + (config.align != "none") + len(config.curve_workdirs)
  _, timing, sets = dry_run_lib.time_on_zero_batches(
      "path point (one t)", two_ts, None, config.data, mesh,
      global_batch=examples_per_t // 4, num_steps=num_paths * config.num_t, to_batch=as_eval_sets)
  return dry_run_lib.report(
      f"eval_path: {num_paths} path(s) x {config.num_t} t of {type(model).__name__} on "
      f"{config.data.dataset}; end points: {source}", mesh,
      {"end point params": points, "eval batch": sets[0]}, [timing])


def eval_path(config: Any, workdir: str, *, overwrite: bool = False) -> dict:
  """LMC, LMC-P and fitted curves between two trained models, on the four views.

  Returns:
    The eval_path.json record.
  """
  if config.get("dry_run", False):
    return dry_run_eval_path(config)
  mesh = mesh_lib.data_mesh()
  check_eval_path_config(config, mesh.devices.size)
  start_run = train.load_trained(config.start_workdir)
  end_run = train.load_trained(config.end_workdir)
  _check_endpoints(start_run, end_run, config.data)
  fitted = [load_curve(w) for w in config.curve_workdirs]
  ends = {"start": train.run_identity(start_run), "end": train.run_identity(end_run)}
  curve_configs = [_check_curve_ends(record, w, ends, start_run, end_run)
                   for (record, _), w in zip(fitted, config.curve_workdirs)]
  inputs = {**ends, "curves": [{"config": c, "step": r["step"]}
                               for c, (r, _) in zip(curve_configs, fitted)]}
  with train.claimed(config, workdir, EVAL_PATH_LAYOUT, overwrite, inputs=inputs) as config_dict:
    return _eval_path(config, workdir, mesh, config_dict, start_run, end_run, fitted)


def _eval_path(config, workdir, mesh, config_dict, start_run, end_run, fitted) -> dict:
  # Data: the views to evaluate on, and the training data BatchNorm is recomputed from.
  data = config.data
  data_args = train.loader_args(data)
  test_views, test_labels = pipeline.load_test_views(
      data.dataset, data.cue, num_examples=train.examples_or_all(data.num_test), **data_args)
  view_batches = train.shard_views(test_views, test_labels, config.eval_batch_size, mesh)
  bn_proportion = 0.0 if config.bn.data == "clean" else data.cue_proportion
  bn_split = pipeline.load_train_split(data.dataset, data.cue, bn_proportion,
                                       num_examples=config.bn.num_examples, **data_args)
  bn_examples = bn_split.examples(np.arange(len(bn_split)))
  bn_batches = batching.stack_batches(bn_examples["image"], bn_examples["label"],
                                      config.eval_batch_size, drop_remainder=True)
  bn_batches = {"image": bn_batches["image"]}
  model = start_run.model
  ts = np.linspace(0.0, 1.0, config.num_t)

  # Paths: name -> (kind, control points).
  path_points = {"linear": ("linear", (start_run.params, end_run.params))}
  alignment = None
  if config.align != "none":
    spec = align.permutation_spec(start_run.config["model"]["name"], start_run.params)
    if config.align == "weight":
      perm = align.weight_matching(spec, start_run.params, end_run.params, seed=config.seed)
    else:
      perm = align.activation_matching(model.apply, spec, start_run.variables,
                                       end_run.variables, list(bn_batches["image"]))
    aligned_end = align.apply_permutation(spec, perm, end_run.params)
    path_points["linear (aligned)"] = ("linear", (start_run.params, aligned_end))
    moved = {k: float(np.mean(v != np.arange(len(v)))) for k, v in perm.items()}
    alignment = {"method": config.align, "fraction_of_units_moved": moved,
                 "matched_on": (f"{len(bn_batches['image']) * config.eval_batch_size} "
                                f"{config.bn.data} training images"
                                if config.align == "activation" else "weights")}
  for (record, free), w in zip(fitted, config.curve_workdirs):
    label = curve_label(record)
    if label in path_points:  # two curves of one kind on one dataset: name them apart
      label = f"{label} [{os.path.basename(os.path.normpath(w))}]"
    path_points[label] = (record["kind"],
                          curves.curve_points(start_run.params, free, end_run.params))

  start = time.perf_counter()
  results = {}
  for name, (kind, points) in path_points.items():
    views = jax.device_get(counterfactual.evaluate_path_views(
        model.apply, points, ts, view_batches, path=kind, bn_batches=bn_batches, mesh=mesh))
    verdict = counterfactual.path_verdict(views, metric=config.barrier_metric,
                                          tolerance=config.barrier_tolerance)
    results[name] = {
        "kind": kind,
        "views": {v: {"loss": np.asarray(r.loss).tolist(),
                      "accuracy": np.asarray(r.accuracy).tolist()} for v, r in views.items()},
        **verdict}
  seconds = time.perf_counter() - start

  record = {
      "ts": ts.tolist(),
      "paths": results,
      "alignment": alignment,
      "start": {"checkpoint": start_run.checkpoint, "seed": start_run.config["seed"],
                "data": start_run.config["data"]},
      "end": {"checkpoint": end_run.checkpoint, "seed": end_run.config["seed"],
              "data": end_run.config["data"]},
      "curves": [{"workdir": os.path.abspath(w), **{k: r[k] for k in (
          "kind", "num_free", "step", "fit_data")}} for w, (r, _) in zip(
              config.curve_workdirs, fitted)],
      "batchnorm": {"recomputed_at_every_t_from": config.bn.data,
                    "dataset": data.dataset,
                    "num_examples": int(bn_batches["image"].shape[0] *
                                        bn_batches["image"].shape[1])},
      "eval": {"dataset": data.dataset, "cue": data.cue, "num_examples": int(len(test_labels)),
               "views_seed": data.seed},
      "seconds": round(seconds, 1),
      "backend": jax.default_backend(),
      "devices": int(mesh.devices.size),
      "path_eval_sharded_over": next(iter(views.values())).sharded_over,
      "config": config_dict,
  }
  print(format_barrier_table(record))
  if jax.process_index() == 0:
    workdir_lib.write_json_atomic(os.path.join(workdir, EVAL_PATH_FILE), record)
    report.plot_path_views(record, os.path.join(workdir, EVAL_PATH_FIGURE))
  return record


def format_barrier_table(record: dict) -> str:
  """Paths x views: accuracy barrier (its t) and the verdict."""
  views = list(next(iter(record["paths"].values()))["views"])
  width = max(len(n) for n in record["paths"]) + 2
  lines = [f"{'path':{width}s}" + "".join(f"{v:>16s}" for v in views) + "  verdict"]
  for name, p in record["paths"].items():
    cells = "".join(f"{p['barriers'][v]['error']:9.3f} @{p['barriers'][v]['error_t']:4.2f} "
                    for v in views)
    verdict = ("connected" if p["mechanistically_connected"]
               else "broken on " + ", ".join(p["broken_views"]))
    lines.append(f"{name:{width}s}{cells}  {verdict}")
  lines.append(f"(accuracy barrier per view and the t of its maximum; a path is mechanistically "
               f"connected when no view's {record['paths'][next(iter(record['paths']))]['metric']}"
               f" barrier exceeds {record['paths'][next(iter(record['paths']))]['tolerance']})")
  return "\n".join(lines)
