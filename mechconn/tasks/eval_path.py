"""The `eval_path` task: LMC, aligned LMC and fitted curves on the four views.

Between a cue model (t = 0) and a no-cue model (t = 1), both finished `train`
runs, evaluates the linear path (LMC), the linear path after permutation
alignment (LMC-P) and every fitted curve (QMC) on the four counterfactual
views, with BatchNorm statistics recomputed at each t, and writes
`eval_path.json` (curves, `PathEval.summary()` per view, the Definition 5
verdict, and what produced them), `eval_path.png` (loss and accuracy along t,
one column of panels per path, one line per view) and, with tensorboardX
installed, the same curves as TensorBoard scalars (`EVAL_PATH_EVENTS`: tag
'<path>/<view>/<loss|accuracy>', step round(1000 t), `metric_writers.t_step`).

With `diagnostics.run` (or the `diagnose` modifier) it also runs the
diagnostics of `mechconn.diagnostics` on every path (`path_diagnostics`: the
record's 'diagnostics', `eval_path_<diagnostic>.png`). An end point may be a
finished `finetune` run (the cue model fine-tuned; `runs.load_model_run`).

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
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mechconn import align
from mechconn import barriers
from mechconn import config_checks as checks
from mechconn import counterfactual
from mechconn import curves
from mechconn import dry_run as dry_run_lib
from mechconn import input_checks
from mechconn import metric_writers
from mechconn import objectives
from mechconn import report
from mechconn import symmetry
from mechconn import workdir as workdir_lib
from mechconn.data.views import VIEWS
from mechconn.tasks import alignment
from mechconn.tasks import data as task_data
from mechconn.tasks import model_checks
from mechconn.tasks import path_diagnostics
from mechconn.tasks import runner
from mechconn.tasks import runs
from mechconn.tasks import sequences as task_sequences
from mechconn.tasks import specs

NAME = "eval_path"
EVAL_PATH_FILE = "eval_path.json"
EVAL_PATH_FIGURE = "eval_path.png"
# The curves as TensorBoard scalars (one file, replaced by a rerun as eval_path.json is).
EVAL_PATH_EVENTS = "events.out.tfevents.eval_path" + metric_writers.EVENT_FILE_SUFFIX
LAYOUT = workdir_lib.Layout(files=(EVAL_PATH_FILE, EVAL_PATH_FIGURE, EVAL_PATH_EVENTS,
                                    *path_diagnostics.FIGURES.values()))
ALIGNMENTS = alignment.ALIGNMENTS
# What activation matching correlates: the ReLU of every site (the units' outputs, as the
# official code matches VGG/ResNet blocks) or the module outputs before it.
ACTIVATION_SITES = {"post_relu": jax.nn.relu, "module_outputs": None}
BN_DATA = ("clean", "train")
SEQUENCE_ALIGNMENTS = ("none", "weight")  # language models: no activation matching


@dataclasses.dataclass(frozen=True)
class EvalPathSpec:
  """An `eval_path` config, resolved."""

  seed: int  # weight matching's order of permutation groups
  data: specs.DataSpec
  endpoints: runs.EndpointsSpec
  curve_workdirs: tuple[str, ...]
  align: str
  activation_sites: str  # image models: what activation matching correlates
  path: specs.PathSpec
  bn_data: str  # image models: BatchNorm statistics from clean or train data
  eval_batch_size: int
  barrier_metric: str
  barrier_tolerance: float
  diagnostics: path_diagnostics.DiagnosticsSpec
  dry_run: bool

  @property
  def num_paths(self) -> int:
    return 1 + (self.align != "none") + len(self.curve_workdirs)


def resolve(config: ml_collections.ConfigDict, num_devices: int) -> EvalPathSpec:
  """An `eval_path` config, checked before any work (ValueError naming the key)."""
  checks.check_int(config.seed, "seed")
  data = specs.data_spec(config.data, NAME)
  curve_workdirs = tuple(config.curve_workdirs)
  if data.is_sequence:
    checks.check_choice(config.align, SEQUENCE_ALIGNMENTS, "align")
    if curve_workdirs:
      raise ValueError("config.curve_workdirs must be empty for language models: fit_curve "
                       "fits curves between image models only.")
    sites, bn_data = "", ""
  else:
    checks.check_choice(config.align, ALIGNMENTS, "align")
    checks.check_choice(config.activation_sites, tuple(ACTIVATION_SITES), "activation_sites")
    checks.check_choice(config.path.bn_data, BN_DATA, "path.bn_data")
    sites, bn_data = config.activation_sites, config.path.bn_data
  path = specs.path_spec(config.path, sequence=data.is_sequence)
  eval_batch = specs.eval_batch_size(config.eval_batch_size, num_devices)
  if path.bn_examples < eval_batch:
    raise ValueError(f"config.path.bn_examples={path.bn_examples} makes no full batch "
                     f"of eval_batch_size={eval_batch}.")
  if path.bn_examples > data.num_train_examples:
    raise ValueError(f"config.path.bn_examples={path.bn_examples} exceeds the "
                     f"{data.num_train_examples} training examples.")
  checks.check_choice(config.barrier_metric, ("error", "loss"), "barrier_metric")
  checks.check_number(config.barrier_tolerance, "barrier_tolerance", low=0.0)
  for i, w in enumerate(curve_workdirs):
    if not w:
      raise ValueError(f"config.curve_workdirs[{i}] is empty: give a finished fit_curve run.")
  return EvalPathSpec(
      seed=config.seed, data=data, endpoints=runs.endpoints_spec(config, data),
      curve_workdirs=curve_workdirs, align=config.align, activation_sites=sites, path=path,
      bn_data=bn_data, eval_batch_size=eval_batch, barrier_metric=config.barrier_metric,
      barrier_tolerance=config.barrier_tolerance,
      diagnostics=path_diagnostics.resolve(config.get("diagnostics"), data),
      dry_run=config.dry_run)


@dataclasses.dataclass(frozen=True)
class Inputs:
  """The end points and the fitted curves: [(curve.json record, free points)]."""

  endpoints: runs.Endpoints
  curves: list[tuple[dict, tuple]]


def inputs(spec: EvalPathSpec, dry_run: bool) -> tuple[Inputs, dict]:
  """The end points and curves (a curve fitted between other end points is refused)."""
  endpoints, ends = runs.load_endpoints(spec.endpoints, spec.data, dry_run)
  if not spec.data.is_sequence:  # settings that depend on the runs' model, not the stand-in
    model_checks.check_bn_variance(spec.path, endpoints.start.model, spec.data.input_shape)
    if spec.align == "activation":
      model_checks.check_activation_sites(spec.activation_sites, endpoints.start.model,
                                          spec.data.input_shape)
  if dry_run:
    return Inputs(endpoints, []), {}
  fitted = [runs.load_curve(w) for w in spec.curve_workdirs]
  curve_configs = [runs.check_curve_ends(record, w, ends, endpoints.start, endpoints.end)
                   for (record, _), w in zip(fitted, spec.curve_workdirs)]
  identities = {**ends, "curves": [{"config": c, "step": r["step"]}
                                   for c, (r, _) in zip(curve_configs, fitted)]}
  return Inputs(endpoints, fitted), identities


def _objective(spec: EvalPathSpec) -> objectives.Objective:
  return task_sequences.OBJECTIVE if spec.data.is_sequence else objectives.CLASSIFICATION


def evaluate(spec: EvalPathSpec, job: runner.Job, path: tuple, sets: tuple) -> dict:
  """{eval set: PathEval} of one path (kind, points, ts) on (eval sets, statistics batches)."""
  endpoints = job.inputs.endpoints
  kind, points, ts = path
  eval_sets, bn_batches = sets
  with warnings.catch_warnings():
    if spec.endpoints.allow_identical:  # asked for (a control): the warning is not repeated
      warnings.simplefilter("ignore", input_checks.IdenticalEndpointsWarning)
    return barriers.evaluate_path_on_sets(
        endpoints.start.spec.apply_fn(endpoints.start.model), points, ts, eval_sets,
        path=kind, bn_batches=bn_batches, mesh=job.mesh, renormalize=spec.path.renormalize,
        objective=_objective(spec))


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


def eval_data(spec: EvalPathSpec, mesh: jax.sharding.Mesh) -> tuple[dict, dict, dict]:
  """(eval sets, statistics batches, what they are for the record).

  Image models: the four views, and the training images BatchNorm is recomputed
  from; language models: the held-out sequences, and the training sequences of
  REPAIR's statistics.
  """
  data, path = spec.data, spec.path
  if data.is_sequence:
    eval_sets = task_sequences.eval_sets(data, spec.eval_batch_size, mesh)
    bn_batches = task_sequences.statistics_batches(data, path.bn_examples, spec.eval_batch_size)
    num_bn = int(np.prod(bn_batches["tokens"].shape[:2]))
    return eval_sets, bn_batches, {
        "renormalize": {"method": path.renormalize or "none", "statistics_from": "train",
                        "dataset": data.dataset, "num_examples": num_bn},
        "eval": {"dataset": data.dataset, "num_examples": int(data.num_test), "seed": data.seed}}
  test_views, test_labels = task_data.load_test_views(data)
  eval_sets = task_data.shard_views(test_views, test_labels, spec.eval_batch_size, mesh)
  bn_split = task_data.load_train_split(
      data, cue_proportion=0.0 if spec.bn_data == "clean" else data.cue_proportion,
      num_examples=path.bn_examples)
  bn_batches = task_data.bn_batches_of(bn_split.examples(np.arange(len(bn_split))),
                                       spec.eval_batch_size)
  num_bn = int(np.prod(bn_batches["image"].shape[:2]))
  return eval_sets, bn_batches, {
      "batchnorm": {"recomputed_at_every_t_from": spec.bn_data,
                    "dataset": data.dataset, "num_examples": num_bn},
      "eval": {"dataset": data.dataset, "cue": data.cue, "num_examples": int(len(test_labels)),
               "views_seed": data.seed}}


def aligned_path(spec: EvalPathSpec, endpoints: runs.Endpoints, bn_batches: dict
                  ) -> tuple[tuple, dict]:
  """The linear path after alignment, (kind, points), and what the alignment did."""
  start_run, end_run = endpoints.start, endpoints.end
  perm_spec = _permutation_spec(spec, start_run, bn_batches)
  batches = list(bn_batches["image"]) if spec.align == "activation" else []
  aligned_end, perm = alignment.aligned_end(
      spec.align, perm_spec, start_run.model.apply, start_run.variables, end_run.variables,
      batches, seed=spec.seed, post=ACTIVATION_SITES.get(spec.activation_sites))
  record = {"method": spec.align,
            "fraction_of_units_moved": {k: float(np.mean(v != np.arange(len(v))))
                                        for k, v in perm.items()},
            "matched_on": (f"{len(batches) * spec.eval_batch_size} {spec.bn_data} training "
                           "images" if spec.align == "activation" else "weights")}
  if spec.align == "activation":
    record["activation_sites"] = spec.activation_sites
  return ("linear", (start_run.params, aligned_end)), record


def _permutation_spec(spec: EvalPathSpec, run: runs.TrainedModel, bn_batches: dict):
  """The model's permutation spec: written for the built-in models, else derived."""
  name = run.config["model"]["name"]
  if name in align.WRITTEN_SPECS:
    return align.permutation_spec(name, run.params)
  example = _objective(spec).inputs_of(jax.tree.map(lambda x: x[0], bn_batches))
  return symmetry.derive_spec(run.spec.apply_fn(run.model), run.variables, example)


def _diagnostics(spec: EvalPathSpec, job: runner.Job, paths: dict, results: dict,
                 sets: tuple) -> dict:
  """{path: its diagnostics record} (`path_diagnostics`), the grid's barriers beside each."""
  start_run = job.inputs.endpoints.start
  view_batches, bn_batches = sets
  data = path_diagnostics.path_data(
      spec.diagnostics, start_run.spec.apply_fn(start_run.model), view_batches, bn_batches,
      data=spec.data, renormalize=spec.path.renormalize,
      perm_spec=_permutation_spec(spec, start_run, bn_batches),
      batch_size=spec.eval_batch_size)
  grids = {name: {view: {m: {"value": b[m], "t": b[f"{m}_t"], "num_evaluations": spec.path.num_t}
                         for m in ("loss", "error")}
                  for view, b in results[name]["barriers"].items()} for name in paths}
  return path_diagnostics.run(spec.diagnostics, data, {
      name: (kind, points, grids[name]) for name, (kind, points) in paths.items()})


def _paths(spec: EvalPathSpec, inputs: Inputs, bn_batches: dict) -> tuple[dict, dict | None]:
  """{name: (kind, control points)} of every path, and what the alignment did (or None)."""
  start_run, end_run = inputs.endpoints.start, inputs.endpoints.end
  paths = {"linear": ("linear", (start_run.params, end_run.params))}
  record = None
  if spec.align != "none":
    paths["linear (aligned)"], record = aligned_path(spec, inputs.endpoints, bn_batches)
  for (fitted, free), w in zip(inputs.curves, spec.curve_workdirs):
    label = runs.curve_label(fitted)
    if label in paths:  # two curves of one kind on one dataset: name them apart
      label = f"{label} [{os.path.basename(os.path.normpath(w))}]"
    paths[label] = (fitted["kind"], curves.curve_points(start_run.params, free, end_run.params))
  return paths, record


def run(spec: EvalPathSpec, job: runner.Job) -> dict:
  """Evaluates every path; returns the eval_path.json record."""
  start_run, end_run = job.inputs.endpoints.start, job.inputs.endpoints.end
  view_batches, bn_batches, provenance = eval_data(spec, job.mesh)
  ts = np.linspace(0.0, 1.0, spec.path.num_t)
  paths, alignment_record = _paths(spec, job.inputs, bn_batches)
  start = time.perf_counter()
  results = {}
  for name, (kind, points) in paths.items():
    views = jax.device_get(evaluate(spec, job, (kind, points, ts), (view_batches, bn_batches)))
    verdict = counterfactual.path_verdict(views, metric=spec.barrier_metric,
                                          tolerance=spec.barrier_tolerance)
    results[name] = {
        "kind": kind,
        "views": {v: runs.path_curves(r) for v, r in views.items()},
        **verdict}
  seconds = round(time.perf_counter() - start, 1)  # the paths' evaluation
  diagnostics = (_diagnostics(spec, job, paths, results, (view_batches, bn_batches))
                 if spec.diagnostics.enabled else None)
  record = {
      "ts": ts.tolist(),
      "paths": results,
      **({"diagnostics": diagnostics} if diagnostics else {}),
      "alignment": alignment_record,
      "start": {"checkpoint": start_run.checkpoint, "seed": start_run.config["seed"],
                "data": start_run.config["data"]},
      "end": {"checkpoint": end_run.checkpoint, "seed": end_run.config["seed"],
              "data": end_run.config["data"]},
      "curves": [{"workdir": os.path.abspath(w), **{k: r[k] for k in (
          "kind", "num_free", "step", "fit_data")}} for w, (r, _) in zip(
              spec.curve_workdirs, job.inputs.curves)],
      **provenance,
      "seconds": seconds,
      "backend": jax.default_backend(),
      "devices": int(job.mesh.devices.size),
      "path_eval_sharded_over": next(iter(views.values())).sharded_over,
      "config": job.config_dict,
  }
  print(format_barrier_table(record))
  if diagnostics:
    print(path_diagnostics.format_table(diagnostics))
  runner.write_outputs(job.workdir, {
      **(path_diagnostics.figures(diagnostics) if diagnostics else {}),
      EVAL_PATH_FILE: record,
      EVAL_PATH_FIGURE: functools.partial(report.plot_path_views, record),
      EVAL_PATH_EVENTS: functools.partial(metric_writers.write_curves, record["ts"],
                                          tensorboard_curves(record))})
  return record


def tensorboard_curves(record: dict) -> dict[str, list[float]]:
  """{'<path>/<view>/<metric>': values over t} of an eval_path record, for TensorBoard."""
  return {f"{name}/{view}/{metric}": values for name, entry in record["paths"].items()
          for view, curves in entry["views"].items() for metric, values in curves.items()}


def dry_run(spec: EvalPathSpec, job: runner.Job) -> dict:
  """One t of a path timed (the evaluation of two t on one batch), the evaluation's estimate.

  A "step" is one t: statistics from `path.bn_examples` examples and the eval
  sets (four views, or the held-out sequences); the timed call evaluates two t
  on one eval and one statistics batch, so its batch is a quarter of one t's
  examples. The estimate leaves out the alignment (seconds for weight matching) and the
  diagnostics (`path_diagnostics`; their costs per t: docs/performance.md).
  """
  endpoints = job.inputs.endpoints
  num_sets = 1 if spec.data.is_sequence else len(VIEWS)
  examples_per_t = spec.path.bn_examples + num_sets * spec.data.num_test_examples
  two_ts = ("linear", (endpoints.start.params, endpoints.end.params), np.linspace(0, 1, 2))

  def point(path: tuple, sets: tuple) -> tuple:  # the timer's (carry, batch) -> (carry, out)
    return path, evaluate(spec, job, path, sets)

  _, timing, sets = dry_run_lib.time_on_zero_batches(
      "path point (one t)", point, two_ts, spec.data.input_shape, job.mesh,
      global_batch=examples_per_t // 4, num_steps=spec.num_paths * spec.path.num_t,
      to_batch=_as_sequence_sets if spec.data.is_sequence else _as_eval_sets)
  return dry_run_lib.report(
      f"eval_path: {spec.num_paths} path(s) x {spec.path.num_t} t of "
      f"{type(endpoints.start.model).__name__} on {spec.data.dataset}; end points: "
      f"{endpoints.source}", job.mesh,
      {"end point params": (endpoints.start.params, endpoints.end.params),
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
