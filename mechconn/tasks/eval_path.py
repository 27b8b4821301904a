"""The `eval_path` task: LMC, aligned LMC and fitted curves on the four views.

Between a cue model (t = 0) and a no-cue model (t = 1), both finished `train`
runs, evaluates the linear path (LMC), the linear path after permutation
alignment (LMC-P) and every fitted curve (QMC) on the four counterfactual
views, with BatchNorm statistics recomputed at each t, and writes
`eval_path.json` (curves, `PathEval.summary()` per view, the Definition 5
verdict, and what produced them) and `eval_path.png` (accuracy along t, one
panel per path, one line per view).

Between two language models (train runs on a sequence dataset,
`tasks.sequences`) it evaluates the linear path and, with `align='weight'`,
the linear path after weight matching on a permutation spec derived from the
model (`symmetry.derive_spec`), with the next-token objective on the runs'
held-out sequences (one eval set, 'test'), renormalised at each t by REPAIR
(`path.renormalize='repair'`, statistics from `path.bn_examples` training
sequences) or not at all; the record has the same layout.
"""

import dataclasses
import functools
import os
import time
from typing import Any
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from mechconn import align
from mechconn import barriers
from mechconn import config_checks as checks
from mechconn import counterfactual
from mechconn import curves
from mechconn import dry_run as dry_run_lib
from mechconn import input_checks
from mechconn import matching
from mechconn import objectives
from mechconn import report
from mechconn import symmetry
from mechconn import workdir as workdir_lib
from mechconn.data.views import VIEWS
from mechconn.tasks import config as task_config
from mechconn.tasks import data as task_data
from mechconn.tasks import fit_curve
from mechconn.tasks import runner
from mechconn.tasks import runs
from mechconn.tasks import sequences as task_sequences

NAME = "eval_path"
EVAL_PATH_FILE = "eval_path.json"
EVAL_PATH_FIGURE = "eval_path.png"
LAYOUT = workdir_lib.Layout(files=(EVAL_PATH_FILE, EVAL_PATH_FIGURE))
ALIGNMENTS = ("none", "weight", "activation")
# What activation matching correlates: the ReLU of every site (the units' outputs, as the
# official code matches VGG/ResNet blocks) or the module outputs before it.
ACTIVATION_SITES = {"post_relu": jax.nn.relu, "module_outputs": None}
BN_DATA = ("clean", "train")
SEQUENCE_ALIGNMENTS = ("none", "weight")  # language models: no activation matching


@dataclasses.dataclass(frozen=True)
class Inputs:
  """The end points and the fitted curves: [(curve.json record, free points)]."""

  endpoints: fit_curve.Endpoints
  curves: list[tuple[dict, tuple]]


def check(config: Any, num_devices: int) -> None:
  """Validates an `eval_path` config before any work (ValueError naming the key)."""
  checks.check_int(config.seed, "seed")
  task_config.check_data_config(config.data, task=NAME)
  task_config.check_model_config(config.endpoint_model, "endpoint_model", config.data.dataset)
  if task_sequences.is_sequence_data(config.data.dataset):
    checks.check_choice(config.align, SEQUENCE_ALIGNMENTS, "align")
    task_sequences.renormalize_of(config.path)
    if config.curve_workdirs:
      raise ValueError("config.curve_workdirs must be empty for language models: fit_curve "
                       "fits curves between image models only.")
  else:
    checks.check_choice(config.align, ALIGNMENTS, "align")
    checks.check_choice(config.activation_sites, tuple(ACTIVATION_SITES), "activation_sites")
    checks.check_choice(config.path.bn_data, BN_DATA, "path.bn_data")
    task_config.renormalize_of(config.path)  # bn_variance; against the model in `inputs`
  checks.check_positive_int(config.path.bn_examples, "path.bn_examples")
  checks.check_int(config.path.num_t, "path.num_t", minimum=2)
  task_config.check_eval_batch_size(config, num_devices)
  if config.path.bn_examples < config.eval_batch_size:
    raise ValueError(f"config.path.bn_examples={config.path.bn_examples} makes no full batch "
                     f"of eval_batch_size={config.eval_batch_size}.")
  available = task_config.num_train_examples(config.data)
  if config.path.bn_examples > available:
    raise ValueError(f"config.path.bn_examples={config.path.bn_examples} exceeds the "
                     f"{available} training examples.")
  checks.check_choice(config.barrier_metric, ("error", "loss"), "barrier_metric")
  checks.check_number(config.barrier_tolerance, "barrier_tolerance", low=0.0)
  for i, w in enumerate(config.curve_workdirs):
    if not w:
      raise ValueError(f"config.curve_workdirs[{i}] is empty: give a finished fit_curve run.")


def inputs(config: Any, dry_run: bool) -> tuple[Inputs, dict]:
  """The end points and curves (a curve fitted between other end points is refused)."""
  endpoints, ends = fit_curve.load_endpoints(config, dry_run)
  if not task_sequences.is_sequence_data(config.data.dataset):
    _check_model_settings(config, endpoints.start.model)
  if dry_run:
    return Inputs(endpoints, []), {}
  fitted = [fit_curve.load_curve(w) for w in config.curve_workdirs]
  curve_configs = [fit_curve.check_curve_ends(record, w, ends, endpoints.start, endpoints.end)
                   for (record, _), w in zip(fitted, config.curve_workdirs)]
  identities = {**ends, "curves": [{"config": c, "step": r["step"]}
                                   for c, (r, _) in zip(curve_configs, fitted)]}
  return Inputs(endpoints, fitted), identities


def _check_model_settings(config: Any, model: Any) -> None:
  """Settings that depend on the end points' model (the runs', not `endpoint_model`, the
  dry run's stand-in), refused before the workdir is claimed."""
  shape = task_config.input_shape(config.data)
  task_config.check_bn_variance(config.path, model, shape)
  if config.align == "activation":
    task_config.check_activation_sites(config.activation_sites, model, shape)


def _evaluate(path: tuple, sets: tuple, *, apply_fn, mesh, renormalize="auto",
              objective=objectives.CLASSIFICATION, allow_identical=False) -> tuple:
  """((kind, points, ts), (eval sets, bn_batches)) -> (path, {set: PathEval}).

  `allow_identical`: identical end points were asked for (a control), so the library's
  warning about them is not repeated."""
  kind, points, ts = path
  eval_sets, bn_batches = sets
  with warnings.catch_warnings():
    if allow_identical:
      warnings.simplefilter("ignore", input_checks.IdenticalEndpointsWarning)
    return path, barriers.evaluate_path_on_sets(apply_fn, points, ts, eval_sets, path=kind,
                                                bn_batches=bn_batches, mesh=mesh,
                                                renormalize=renormalize, objective=objective)


def _varied(x: jax.Array, num_values: int = 4) -> jax.Array:
  """`x` plus a fixed pattern of `num_values` values: the dry run's statistics batch. All-zero
  statistics data are refused by path evaluation (every layer would be constant)."""
  pattern = (jnp.arange(x.size) % num_values).reshape(x.shape)
  return x + pattern.astype(x.dtype)


def _as_eval_sets(zeros: dict) -> tuple[dict, dict]:
  """A zero batch -> one eval set of one batch, and one BatchNorm batch of the same size."""
  n = zeros["label"].shape[0]
  return ({"clean": {"image": zeros["image"][None], "label": zeros["label"][None],
                     "mask": jnp.ones((1, n), jnp.float32)}},
          {"image": _varied(zeros["image"])[None]})


def _as_sequence_sets(zeros: dict) -> tuple[dict, dict]:
  """A zero batch -> the eval set 'test' of one batch of PAD sequences, and one statistics
  batch of the special tokens (PAD, BOS, SEP, EOS: in any vocabulary)."""
  batch = task_sequences.as_sequences(zeros)
  return ({task_sequences.EVAL_SET: jax.tree.map(lambda x: x[None], batch)},
          {"tokens": _varied(batch["tokens"])[None]})


def build(config: Any, mesh: jax.sharding.Mesh, inputs: Inputs) -> runner.Build:
  """The evaluation of one path on the views, as a step.

  A step is `step_fn(path, (view batches, bn_batches))` with path = (kind,
  points, ts); its "batch" size for the dry run's estimate is a quarter of the
  examples one t reads (BatchNorm examples plus four views), because the timed
  call evaluates two t on one eval and one BatchNorm batch. Language models:
  the held-out sequences are the one eval set, the statistics examples
  REPAIR's.
  """
  endpoints = inputs.endpoints
  model = endpoints.start.model
  if task_sequences.is_sequence_data(config.data.dataset):
    num_sets, to_batch = 1, _as_sequence_sets
    renormalize, objective = (task_sequences.renormalize_of(config.path),
                              task_sequences.OBJECTIVE)
  else:
    num_sets, to_batch = len(VIEWS), _as_eval_sets
    renormalize, objective = task_config.renormalize_of(config.path), objectives.CLASSIFICATION
  examples_per_t = config.path.bn_examples + num_sets * task_config.num_test_examples(
      config.data)
  num_paths = 1 + (config.align != "none") + len(config.curve_workdirs)
  two_ts = ("linear", (endpoints.start.params, endpoints.end.params), np.linspace(0, 1, 2))
  return runner.Build(
      name="path point (one t)", init_fn=lambda: two_ts,
      step_fn=functools.partial(_evaluate, apply_fn=runs.apply_fn_of(model, config.data.dataset),
                                mesh=mesh, renormalize=renormalize, objective=objective,
                                allow_identical=config.get("allow_identical_endpoints", False)),
      batch_size=examples_per_t // 4, steps_per_epoch=1,
      num_steps=num_paths * config.path.num_t,
      image_shape=task_config.input_shape(config.data), model=model, to_batch=to_batch)


def _eval_data(config: Any, mesh: jax.sharding.Mesh) -> tuple[dict, dict, Any, dict]:
  """(eval sets, statistics batches, objective, what they are for the record).

  Image models: the four views, and the training images BatchNorm is recomputed
  from; language models: the held-out sequences, and the training sequences of
  REPAIR's statistics.
  """
  data = config.data
  if task_sequences.is_sequence_data(data.dataset):
    eval_sets = task_sequences.eval_sets(data, config.eval_batch_size, mesh)
    bn_batches = task_sequences.statistics_batches(data, config.path.bn_examples,
                                                   config.eval_batch_size)
    num_bn = int(np.prod(bn_batches["tokens"].shape[:2]))
    return eval_sets, bn_batches, task_sequences.OBJECTIVE, {
        "renormalize": {"method": config.path.renormalize, "statistics_from": "train",
                        "dataset": data.dataset, "num_examples": num_bn},
        "eval": {"dataset": data.dataset, "num_examples": int(data.num_test), "seed": data.seed}}
  test_views, test_labels = task_data.load_test_views(data)
  eval_sets = task_data.shard_views(test_views, test_labels, config.eval_batch_size, mesh)
  bn_split = task_data.load_train_split(
      data, cue_proportion=0.0 if config.path.bn_data == "clean" else data.cue_proportion,
      num_examples=config.path.bn_examples)
  bn_batches = task_data.bn_batches_of(bn_split.examples(np.arange(len(bn_split))),
                                       config.eval_batch_size)
  num_bn = int(np.prod(bn_batches["image"].shape[:2]))
  return eval_sets, bn_batches, objectives.CLASSIFICATION, {
      "batchnorm": {"recomputed_at_every_t_from": config.path.bn_data,
                    "dataset": data.dataset, "num_examples": num_bn},
      "eval": {"dataset": data.dataset, "cue": data.cue, "num_examples": int(len(test_labels)),
               "views_seed": data.seed}}


def run(config: Any, workdir: str, mesh: jax.sharding.Mesh, inputs: Inputs,
        config_dict: dict, *, overwrite: bool = False) -> dict:
  """Evaluates every path; returns the eval_path.json record."""
  del overwrite  # the claim, made by runner.launch, already used it
  built = build(config, mesh, inputs)
  start_run, end_run = inputs.endpoints.start, inputs.endpoints.end
  data = config.data
  view_batches, bn_batches, objective, provenance = _eval_data(config, mesh)
  model = built.model
  apply_fn = runs.apply_fn_of(model, data.dataset)
  ts = np.linspace(0.0, 1.0, config.path.num_t)

  # Paths: name -> (kind, control points).
  path_points = {"linear": ("linear", (start_run.params, end_run.params))}
  alignment = None
  if config.align != "none":
    name = start_run.config["model"]["name"]
    example = objective.inputs_of(jax.tree.map(lambda x: x[0], bn_batches))
    spec = (align.permutation_spec(name, start_run.params) if name in align.WRITTEN_SPECS
            else symmetry.derive_spec(apply_fn, start_run.variables, example))
    if config.align == "weight":
      perm = matching.weight_matching(spec, start_run.params, end_run.params, seed=config.seed)
    else:
      perm = matching.activation_matching(model.apply, spec, start_run.variables,
                                          end_run.variables, list(bn_batches["image"]),
                                          post=ACTIVATION_SITES[config.activation_sites])
    aligned_end = align.apply_permutation(spec, perm, end_run.params)
    path_points["linear (aligned)"] = ("linear", (start_run.params, aligned_end))
    moved = {k: float(np.mean(v != np.arange(len(v)))) for k, v in perm.items()}
    alignment = {"method": config.align, "fraction_of_units_moved": moved,
                 "matched_on": (f"{len(bn_batches['image']) * config.eval_batch_size} "
                                f"{config.path.bn_data} training images"
                                if config.align == "activation" else "weights")}
    if config.align == "activation":
      alignment["activation_sites"] = config.activation_sites
  for (record, free), w in zip(inputs.curves, config.curve_workdirs):
    label = fit_curve.curve_label(record)
    if label in path_points:  # two curves of one kind on one dataset: name them apart
      label = f"{label} [{os.path.basename(os.path.normpath(w))}]"
    path_points[label] = (record["kind"],
                          curves.curve_points(start_run.params, free, end_run.params))

  start = time.perf_counter()
  results = {}
  for name, (kind, points) in path_points.items():
    _, views = built.step_fn((kind, points, ts), (view_batches, bn_batches))
    views = jax.device_get(views)
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
              config.curve_workdirs, inputs.curves)],
      **provenance,
      "seconds": round(seconds, 1),
      "backend": jax.default_backend(),
      "devices": int(mesh.devices.size),
      "path_eval_sharded_over": next(iter(views.values())).sharded_over,
      "config": config_dict,
  }
  print(format_barrier_table(record))
  runner.write_outputs(workdir, {EVAL_PATH_FILE: record,
                                 EVAL_PATH_FIGURE: functools.partial(report.plot_path_views,
                                                                     record)})
  return record


def dry_run(config: Any, mesh: jax.sharding.Mesh, inputs: Inputs) -> dict:
  """One t of a path timed with `build`'s step function, the evaluation's estimate.

  A "step" is one t: BatchNorm statistics from `path.bn_examples` examples
  and the four views of the test split. The estimate leaves out the alignment
  (seconds for weight matching).
  """
  built = build(config, mesh, inputs)
  _, timing, sets = runner.time_build(built, mesh, state=built.init_fn())
  num_paths = built.num_steps // config.path.num_t
  return dry_run_lib.report(
      f"eval_path: {num_paths} path(s) x {config.path.num_t} t of "
      f"{type(built.model).__name__} on {config.data.dataset}; end points: "
      f"{inputs.endpoints.source}", mesh,
      {"end point params": (inputs.endpoints.start.params, inputs.endpoints.end.params),
       "eval batch": sets[0]}, [timing])


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
  first = next(iter(record["paths"].values()))
  lines.append(f"(accuracy barrier per view and the t of its maximum; a path is mechanistically "
               f"connected when no view's {first['metric']} barrier exceeds "
               f"{first['tolerance']})")
  return "\n".join(lines)
