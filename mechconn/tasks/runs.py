"""Finished runs as inputs of other tasks, and a model's evaluation on the views.

- `load_trained(workdir)`: the final model of a finished `train` run (its
  config as recorded, its model resolved in today's fields), refused when it
  is not finite;
  `run_identity(run)`: what identifies it (its recorded config and final step,
  not its path), recorded by every task that reads it; `finished_record`:
  whether a directory holds a finished run of exactly this config;
  `check_cue_model`: a given cue model against the study's recipe;
- `load_model_run(workdir)`: a finished train run, or a finished finetune run
  (the cue model's model with the fine-tuned weights);
- `load_endpoints`: a path's two end points (train or finetune runs), checked against each other and
  the data; `load_curve`, `check_curve_ends`: a fitted curve between them;
- `view_eval_fn`, `evaluate_views`, `path_curves`: a model on the four
  counterfactual views (or any named eval sets, with their objective), and a
  path's curves, as floats and lists for records and logs.
"""

from collections.abc import Callable
import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mechconn import checkpoint
from mechconn import counterfactual
from mechconn import finite
from mechconn import loop
from mechconn import objectives
from mechconn import trees
from mechconn import workdir as workdir_lib
from mechconn.objectives import Objective
from mechconn.tasks import records
from mechconn.tasks import specs
from mechconn.types import ApplyFn, Params

FINAL_EVAL_FILE = "final_eval.json"  # what marks a `train` run finished
CURVE_FILE = "curve.json"  # what marks a `fit_curve` run finished


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A finished `train` run, loaded from its workdir."""

  model: nn.Module
  params: Params
  batch_stats: Params
  config: dict  # as recorded (read in today's fields through `records.upgrade`)
  checkpoint: str
  spec: specs.ModelSpec | None = None  # None: a stand-in (a dry run before the run exists)

  @property
  def variables(self) -> dict[str, Params]:
    return trees.variables_of(self.params, self.batch_stats)


def load_trained(workdir: str) -> TrainedModel:
  """The final model of a finished `train` run (its config.json and last checkpoint).

  Raises:
    FileNotFoundError: no finished run there (no config.json or final_eval.json:
      relaunch the train command to finish it).
    ValueError: the workdir holds another task's run.
    finite.NonFiniteError: the run's last checkpoint is not finite (it diverged).
  """
  config_path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.exists(config_path) or not os.path.exists(
      os.path.join(workdir, FINAL_EVAL_FILE)):
    raise FileNotFoundError(
        f"{workdir} holds no finished train run (needs {workdir_lib.CONFIG_FILE} and "
        f"{FINAL_EVAL_FILE}); run or resume the train task there first.")
  with open(config_path) as f:
    config = json.load(f)
  if config.get("task") != "train":
    raise ValueError(f"{workdir} holds a {config.get('task')!r} run, not a 'train' run.")
  today = records.upgrade(config)
  spec = specs.model_spec(specs.section(today["model"]), dataset=today["data"]["dataset"])
  model = spec.build()
  with checkpoint.Checkpointer(os.path.join(workdir, loop.CHECKPOINT_DIR)) as ckpt:
    step = ckpt.latest_step()
    state = ckpt.read(step)
  if not bool(finite.all_finite_jit(state)):
    raise finite.NonFiniteError(
        f"The train run in {workdir} ended with NaN or infinity in its checkpoint "
        f"{ckpt.step_dir(step)} (first at {finite.first_nonfinite_leaf(state)}): it diverged "
        "and cannot serve as a model. Retrain it (e.g. with a lower learning rate).")
  return TrainedModel(model=model, params=state["params"],
                      batch_stats=state.get("batch_stats", {}), config=config,
                      checkpoint=ckpt.step_dir(step), spec=spec)


FINETUNE_RESULT_FILE = "result.json"  # what marks a `finetune` run finished


def load_model_run(workdir: str) -> TrainedModel:
  """The final model of a finished `train` run, or of a finished `finetune` run.

  A fine-tuned model is its cue model's model with the fine-tuning run's last
  checkpoint; its `config` is the cue model's train config (model, data,
  seed) with the fine-tuning run's config under 'finetuned' (method, seed,
  recipe), so it is checked and identified like a train run. Methods without
  a training loop (DFR, scratch's head fits) keep no checkpoint and are refused.
  """
  config_path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  task = None
  if os.path.exists(config_path):
    with open(config_path) as f:
      recorded = json.load(f)
    task = recorded.get("task")
  if task != "finetune":
    return load_trained(workdir)
  if not os.path.exists(os.path.join(workdir, FINETUNE_RESULT_FILE)):
    raise FileNotFoundError(f"{workdir} holds no finished finetune run (needs "
                            f"{FINETUNE_RESULT_FILE}); resume the finetune task there first.")
  checkpoints = os.path.join(workdir, loop.CHECKPOINT_DIR)
  if not os.path.isdir(checkpoints):
    raise ValueError(f"{workdir} holds a finetune run of method {recorded.get('method')!r}, "
                     "which keeps no checkpoint (no training loop); give a run of a loop "
                     "method (naive, lp_ft, cbft, ...).")
  cue = recorded["inputs"]["cue_model"]["config"]
  config = {**cue, "finetuned": {k: v for k, v in recorded.items() if k != "inputs"}}
  today = records.upgrade(cue)
  spec = specs.model_spec(specs.section(today["model"]), dataset=today["data"]["dataset"])
  with checkpoint.Checkpointer(checkpoints) as ckpt:
    step = ckpt.latest_step()
    state = ckpt.read(step)
  if not bool(finite.all_finite_jit(state)):
    raise finite.NonFiniteError(f"The finetune run in {workdir} ended with NaN or infinity "
                                f"in its checkpoint {ckpt.step_dir(step)}.")
  return TrainedModel(model=spec.build(), params=state["params"],
                      batch_stats=state.get("batch_stats", {}), config=config,
                      checkpoint=ckpt.step_dir(step), spec=spec)


def finished_record(directory: str, record_file: str, config_dict: dict,
                    identities: Callable[[], dict | None] | None = None) -> dict | None:
  """The record of a finished run of exactly `config_dict` in `directory`, else None.

  Finished: `record_file` and the config.json it was claimed with are there; of
  this config: the recorded one (read in today's fields) differs in nothing and,
  when `identities()` gives the identities of the finished runs the job reads
  now, it read exactly those (called only when the config matches).
  """
  record_path = os.path.join(directory, record_file)
  config_path = os.path.join(directory, workdir_lib.CONFIG_FILE)
  if not (os.path.exists(record_path) and os.path.exists(config_path)):
    return None
  with open(config_path) as f:
    recorded = json.load(f)
  recorded_inputs = recorded.pop("inputs", None)
  if workdir_lib.config_differences(recorded, config_dict, records.VOCABULARY):
    return None
  read_now = identities() if identities is not None else None
  if read_now and workdir_lib.config_differences(recorded_inputs or {},
                                                 workdir_lib.config_to_dict(read_now),
                                                 records.VOCABULARY):
    return None
  with open(record_path) as f:
    return json.load(f)


def run_identity(run: TrainedModel) -> dict:
  """What identifies a finished run's model: its recorded config and final step.

  Not its path: a run retrained in place keeps the path, and a moved one keeps
  its identity.
  """
  return {"config": run.config, "step": int(os.path.basename(os.path.normpath(run.checkpoint)))}


def evaluate_views(apply_fn: ApplyFn, variables: dict, view_batches: counterfactual.ViewBatches,
                   objective: Objective = objectives.CLASSIFICATION
                   ) -> dict[str, dict[str, float]]:
  """{view: {'loss', 'accuracy'}} (the objective's metrics) as floats
  (`counterfactual.evaluate_views`, checked)."""
  results = jax.device_get(counterfactual.evaluate_views(apply_fn, variables, view_batches,
                                                         objective))
  return {view: {k: float(v) for k, v in r.items()} for view, r in results.items()}


def view_eval_fn(model_of_state: Callable[[Any], tuple[ApplyFn, dict]],
                 view_batches: counterfactual.ViewBatches,
                 objective: Objective = objectives.CLASSIFICATION) -> Callable[[Any], dict]:
  """state -> {'eval/<view>/<loss|accuracy>': float}, computed once per step.

  `model_of_state(state)` gives (apply_fn, variables) to evaluate on the
  views (or any named eval sets) with `objective`. The loop's last evaluation
  is also the final one: results are kept by step.
  """
  evaluated = {}

  def eval_fn(state):
    step = int(state.step)
    if step not in evaluated:
      apply_fn, variables = model_of_state(state)
      evaluated[step] = {f"eval/{view}/{k}": v for view, r in
                         evaluate_views(apply_fn, variables, view_batches, objective).items()
                         for k, v in r.items()}
    return evaluated[step]

  return eval_fn


def path_curves(result: Any) -> dict[str, list[float]]:
  """{'loss', 'accuracy'}: a path evaluation's (`barriers.PathEval`) curves over t, as lists
  for a record."""
  return {"loss": np.asarray(result.loss).tolist(),
          "accuracy": np.asarray(result.accuracy).tolist()}


def views_of(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
  """{'eval/cue/loss': ...} -> {'cue': {'loss': ...}}."""
  out: dict[str, dict[str, float]] = {}
  for key, value in metrics.items():
    _, view, name = key.split("/")
    out.setdefault(view, {})[name] = value
  return out


# The fields of a cue model's train config that the study's statements depend on.
CUE_MODEL_FIELDS = ("data.dataset", "data.cue", "data.cue_proportion", "data.num_train",
                    "data.seed", "model.")


def check_cue_model(cue_model: TrainedModel, workdir: str, train_config: dict) -> None:
  """Raises unless a given cue model was trained with `train_config`'s data and model.

  Compares dataset, cue kind and proportion, training set size, data seed
  (and the simple dataset of Dominoes), model name and attributes.
  """
  recorded = workdir_lib.flatten(records.upgrade(cue_model.config, train_config))
  expected = workdir_lib.flatten(train_config)
  fields = CUE_MODEL_FIELDS + (("data.simple_dataset",) if expected["data.cue"] == "dominoes"
                               else ())
  keys = sorted(k for k in set(recorded) | set(expected)
                if any(k == f or (f.endswith(".") and k.startswith(f)) for f in fields))
  diff = [k for k in keys if recorded.get(k) != expected.get(k)]
  if diff:
    raise ValueError(
        f"config.cue_model_workdir={workdir!r} holds a model trained with "
        + ", ".join(f"{k}={recorded.get(k)!r}" for k in diff) + " but config.train has "
        + ", ".join(f"{k}={expected.get(k)!r}" for k in diff)
        + ". Set config.train to the cue model's recipe (e.g. --config.train."
        f"{diff[0]}={recorded.get(diff[0])!r}), or give a cue model trained with this one.")


# --- End points of a path. -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Endpoints:
  """The two end points (t = 0 and t = 1) and where they came from."""

  start: TrainedModel
  end: TrainedModel
  source: str


def check_distinct(start: TrainedModel, end: TrainedModel, allow_identical: bool) -> None:
  """Refuses one run (or two runs of identical weights) as both end points: a path from a
  model to itself is flat, and would be recorded as "connected". `allow_identical`
  (config.allow_identical_endpoints) asks for it explicitly, e.g. as a control."""
  if allow_identical:
    return
  same_run = os.path.realpath(start.checkpoint) == os.path.realpath(end.checkpoint)
  if same_run or _same_weights(start.params, end.params):
    what = (f"the same run ({start.checkpoint})" if same_run else
            f"two runs of identical weights ({start.checkpoint} and {end.checkpoint})")
    raise ValueError(f"The end points are {what}: the path between them is one model, flat by "
                     "construction. Give two different runs as config.start_workdir and "
                     "config.end_workdir, or set config.allow_identical_endpoints=True to "
                     "evaluate it anyway (a control).")


def _same_weights(a, b) -> bool:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b) and
          all(np.shape(x) == np.shape(y) and np.array_equal(x, y)
              for x, y in zip(jax.device_get(leaves_a), jax.device_get(leaves_b))))


def check_endpoints(start: TrainedModel, end: TrainedModel, data: specs.DataSpec) -> None:
  """The end points share one model (and compute dtype), and were trained on this config's
  dataset and views (language models: on its sequence dataset)."""
  models = [records.upgrade(run.config)["model"] for run in (start, end)]
  for key in ("name", "kwargs", "dtype"):
    a, b = (model[key] for model in models)
    if a != b:
      raise ValueError(f"The end points' models differ in model.{key}: {a!r} vs {b!r}; a path "
                       "is evaluated in one model, so give end points of one model"
                       f"{' and dtype' if key == 'dtype' else ''}.")

  def views(cue):  # cue 'none' (plain data) is evaluated on box views
    return "box" if cue == "none" else cue

  if data.is_sequence:
    keys = ("dataset",)
  else:
    keys = ("dataset", "cue") + (("simple_dataset",) if data.cue == "dominoes" else ())
  for run in (start, end):
    recorded = run.config["data"]
    for key in keys:
      value = getattr(data, key)
      same = (views(recorded[key]) == views(value) if key == "cue" else recorded[key] == value)
      if not same:
        raise ValueError(f"The end point {run.checkpoint} was trained with data.{key}="
                         f"{recorded[key]!r} but this config has config.data.{key}="
                         f"{value!r}; set it to match, or use end points trained on it.")


@dataclasses.dataclass(frozen=True)
class EndpointsSpec:
  """Which finished train runs are a path's end points (t = 0 and t = 1)."""

  start_workdir: str
  end_workdir: str
  stand_in: specs.ModelSpec  # `endpoint_model`: a dry run's model before the runs exist
  allow_identical: bool  # one run (or identical weights) at both ends, asked for as a control


def endpoints_spec(config: specs.Section, data: specs.DataSpec) -> EndpointsSpec:
  """The checked end-point fields of a fit_curve or eval_path config."""
  for key in ("start_workdir", "end_workdir"):
    if not config[key]:
      raise ValueError(f"config.{key} is empty: give the workdir of a finished train run.")
  return EndpointsSpec(
      start_workdir=config.start_workdir, end_workdir=config.end_workdir,
      stand_in=specs.model_spec(config.endpoint_model, "endpoint_model", dataset=data.dataset),
      allow_identical=bool(config.allow_identical_endpoints))


def load_endpoints(spec: EndpointsSpec, data: specs.DataSpec, dry_run: bool
                   ) -> tuple[Endpoints, dict]:
  """The end points' finished train runs, checked, and their identities.

  For a dry run (which may come before the end points exist) fresh inits of
  `spec.stand_in` stand in for missing runs.
  """
  try:
    start, end = (load_model_run(w) for w in (spec.start_workdir, spec.end_workdir))
  except FileNotFoundError:
    if not dry_run:
      raise
    model = spec.stand_in.build()
    sample = jnp.zeros((1, *data.input_shape), jnp.int32 if data.is_sequence else jnp.float32)
    start, end = (TrainedModel(model=model, params=v["params"],
                               batch_stats=v.get("batch_stats", {}), config={},
                               checkpoint="", spec=spec.stand_in)
                  for v in (model.init(jax.random.key(seed), sample) for seed in (0, 1)))
    return Endpoints(start, end, "fresh inits (the end points' runs are not there yet)"), {}
  check_endpoints(start, end, data)
  check_distinct(start, end, spec.allow_identical)
  return (Endpoints(start, end, "the end points' train runs"),
          {"start": run_identity(start), "end": run_identity(end)})


# --- A finished fit_curve run, as an input of eval_path. ----------------------------


def load_curve(workdir: str) -> tuple[dict, tuple]:
  """(curve.json record, free control points) of a finished fit_curve run."""
  path = os.path.join(workdir, CURVE_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} holds no finished fit_curve run (no {CURVE_FILE}); "
                            "run or resume the fit_curve task there first.")
  with open(path) as f:
    record = json.load(f)
  state = checkpoint.Checkpointer(os.path.join(workdir, loop.CHECKPOINT_DIR)).read(
      record["step"])
  free = tuple(state["params"][str(k)] for k in range(record["num_free"]))
  return record, free


def check_curve_ends(record: dict, workdir: str, ends: dict, start_run: TrainedModel,
                     end_run: TrainedModel) -> dict:
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
    diff = workdir_lib.config_differences({k: recorded.get(k) for k in ends}, ends,
                                          records.VOCABULARY)
  if diff:
    raise ValueError(f"The curve in {workdir} was fitted between other end points than this "
                     f"config's {start_run.checkpoint} and {end_run.checkpoint} (they differ in "
                     f"{diff[:5]}): an end point was retrained or replaced since. Refit the "
                     "curve.")
  return curve_config


def curve_label(record: dict) -> str:
  """'bezier (fit on clean data)' or 'bezier (fit on cue data, p=1.0)'."""
  data = record["fit_data"]
  on = ("clean data" if data["cue_proportion"] == 0 else
        f"{data['cue']} data, p={data['cue_proportion']}")
  return f"{record['kind']} (fit on {on})"
