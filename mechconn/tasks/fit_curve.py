"""The `fit_curve` task: a Bezier curve (or polygonal chain) between two finished train runs.

t = 0 is the cue model's run (`start_workdir`), t = 1 the no-cue model's
(`end_workdir`); the free control point(s) are fitted on the config's data
(e.g. clean data, or cue data at proportion 1), checkpointed and resumable
like training. Writes curve.json (the curve's provenance and last train loss);
`eval_path` evaluates it.
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

from mechconn import checkpoint
from mechconn import config_checks as checks
from mechconn import curves
from mechconn import dry_run as dry_run_lib
from mechconn import loop
from mechconn import mesh as mesh_lib
from mechconn import rngs
from mechconn import step as step_lib
from mechconn import workdir as workdir_lib
from mechconn.tasks import config as task_config
from mechconn.tasks import data as task_data
from mechconn.tasks import runner
from mechconn.tasks import runs
from mechconn.tasks import sequences as task_sequences

NAME = "fit_curve"
CURVE_FILE = "curve.json"
LAYOUT = dataclasses.replace(loop.LAYOUT, files=loop.LAYOUT.files + (CURVE_FILE,))


@dataclasses.dataclass(frozen=True)
class Endpoints:
  """The two end points (t = 0 and t = 1) and where they came from."""

  start: runs.TrainedModel
  end: runs.TrainedModel
  source: str


def check_distinct(start: runs.TrainedModel, end: runs.TrainedModel, allow_identical: bool
                   ) -> None:
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


def check_endpoints(start: runs.TrainedModel, end: runs.TrainedModel, data: Any) -> None:
  """The end points share one model (and compute dtype), and were trained on this config's
  dataset and views (language models: on its sequence dataset)."""
  for key, default in (("name", None), ("kwargs", None), ("dtype", "float32")):
    a, b = (run.config["model"].get(key, default) for run in (start, end))
    if a != b:
      raise ValueError(f"The end points' models differ in model.{key}: {a!r} vs {b!r}; a path "
                       "is evaluated in one model, so give end points of one model"
                       f"{' and dtype' if key == 'dtype' else ''}.")

  def views(cue):  # cue 'none' (plain data) is evaluated on box views
    return "box" if cue == "none" else cue

  if task_sequences.is_sequence_data(data.dataset):
    keys = ("dataset",)
  else:
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


def load_endpoints(config: Any, dry_run: bool) -> tuple[Endpoints, dict]:
  """The end points' finished train runs, checked, and their identities.

  For a dry run (which may come before the end points exist) fresh inits of
  `config.endpoint_model` stand in for missing runs.
  """
  try:
    start, end = (runs.load_trained(w) for w in (config.start_workdir, config.end_workdir))
  except FileNotFoundError:
    if not dry_run:
      raise
    model = runs.model_of(config.endpoint_model, config.data.dataset)
    sample = jnp.zeros((1, *task_config.input_shape(config.data)),
                       jnp.int32 if task_sequences.is_sequence_data(config.data.dataset)
                       else jnp.float32)
    start, end = (runs.TrainedModel(model=model, params=v["params"],
                                    batch_stats=v.get("batch_stats", {}), config={},
                                    checkpoint="")
                  for v in (model.init(jax.random.key(seed), sample) for seed in (0, 1)))
    return Endpoints(start, end, "fresh inits (the end points' runs are not there yet)"), {}
  check_endpoints(start, end, config.data)
  check_distinct(start, end, config.get("allow_identical_endpoints", False))
  return (Endpoints(start, end, "the end points' train runs"),
          {"start": runs.run_identity(start), "end": runs.run_identity(end)})


def check(config: Any, num_devices: int) -> None:
  """Validates a `fit_curve` config before any work (ValueError naming the key)."""
  checks.check_int(config.seed, "seed")
  task_config.check_data_config(config.data, task=NAME)
  task_config.check_model_config(config.endpoint_model, "endpoint_model")
  task_config.check_loop_config(config, num_devices)
  checks.check_choice(config.curve.kind, curves.CURVE_KINDS, "curve.kind")
  checks.check_choice(config.curve.init, curves.INITS, "curve.init")
  checks.check_positive_int(config.curve.num_free, "curve.num_free")
  for key in ("start_workdir", "end_workdir"):
    if not config[key]:
      raise ValueError(f"config.{key} is empty: give the workdir of a finished train run.")
  task_config.steps_of(task_config.batch_size_of(config, num_devices), config.num_epochs,
                       task_config.num_train_examples(config.data))


def inputs(config: Any, dry_run: bool) -> tuple[Endpoints, dict]:
  return load_endpoints(config, dry_run)


def build(config: Any, mesh: jax.sharding.Mesh, endpoints: Endpoints) -> runner.Build:
  """The curve loss between the end points, the optimiser, the free points' init and step.

  Keys: fresh free points from `fold_in(rngs.init_key(seed), k)`, the step's
  t from `rngs.step_key(seed)`.
  """
  start, end = endpoints.start, endpoints.end
  batch_size = task_config.batch_size_of(config, mesh.devices.size)
  steps_per_epoch, num_steps = task_config.steps_of(
      batch_size, config.num_epochs, task_config.num_train_examples(config.data))
  tx, schedule = task_config.make_optimizer(config.optimizer, num_steps=num_steps,
                                            steps_per_epoch=steps_per_epoch)
  model = start.model
  loss_fn = mesh_lib.replicate(curves.CurveLoss(model.apply, config.curve.kind, start.params,
                                                end.params, start.batch_stats), mesh)
  init_key = rngs.init_key(config.seed)
  image_shape = task_config.input_shape(config.data)
  sample = jnp.zeros((1, *image_shape), jnp.float32)
  num_free = config.curve.num_free

  def init_fn():
    fresh = [model.init(jax.random.fold_in(init_key, k), sample)["params"]
             for k in range(num_free)]
    free = curves.init_free_points(loss_fn.start, loss_fn.end, num_free, config.curve.init,
                                   fresh)
    return step_lib.fresh_state(free, tx)

  step_fn = functools.partial(step_lib.train_step,
                              root_key=mesh_lib.replicate(rngs.step_key(config.seed), mesh),
                              loss_fn=loss_fn, tx=tx)
  return runner.Build(name=f"fit {config.curve.kind}", init_fn=init_fn, step_fn=step_fn,
                      batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                      num_steps=num_steps, image_shape=image_shape, schedule=schedule,
                      model=model)


def run(config: Any, workdir: str, mesh: jax.sharding.Mesh, endpoints: Endpoints,
        config_dict: dict, *, overwrite: bool = False) -> dict:
  """Fits the curve; returns the curve.json record."""
  del overwrite  # the claim, made by runner.launch, already used it
  built = build(config, mesh, endpoints)
  split = task_data.load_train_split(config.data)
  start = time.perf_counter()
  step_fn, batch_fn = task_data.loop_inputs_for(built.step_fn, split, built.batch_size,
                                                config.seed, mesh,
                                                config.data.get("pipeline", "auto"))
  state = loop.train_loop(
      built.init_fn, step_fn, batch_fn, workdir,
      task_config.loop_options(config, built.num_steps, built.steps_per_epoch, built.name),
      mesh=mesh, learning_rate_fn=built.schedule, examples_per_step=built.batch_size,
      run_config=config_dict)
  last = [r for r in workdir_lib.read_metrics(os.path.join(workdir, workdir_lib.METRICS_FILE))
          if "train/loss" in r]
  record = {
      "kind": config.curve.kind,
      "num_free": config.curve.num_free,
      "step": int(state.step),
      "start_checkpoint": endpoints.start.checkpoint,
      "end_checkpoint": endpoints.end.checkpoint,
      "fit_data": {"dataset": config.data.dataset, "cue": config.data.cue,
                   "cue_proportion": config.data.cue_proportion, "num_train": len(split)},
      "final_train_loss": last[-1]["train/loss"] if last else None,
      "seconds_this_session": round(time.perf_counter() - start, 1),
      "config": config_dict,
  }
  runner.write_outputs(workdir, {CURVE_FILE: record})
  print(f"fitted a {config.curve.kind} curve ({config.curve.num_free} free point(s)) on "
        f"{config.data.dataset} p={config.data.cue_proportion}; last train loss "
        f"{record['final_train_loss']:.4f}")
  return record


def dry_run(config: Any, mesh: jax.sharding.Mesh, endpoints: Endpoints) -> dict:
  """One timed curve step of `build`'s step function, the fit's estimate."""
  built = build(config, mesh, endpoints)
  state, timing, batch = runner.time_build(built, mesh)
  return dry_run_lib.report(
      f"fit_curve: {config.curve.kind} with {config.curve.num_free} free point(s) of "
      f"{type(built.model).__name__} on {config.data.dataset} "
      f"(p={config.data.cue_proportion}); end points: {endpoints.source}", mesh,
      {"curve state": state, "batch": batch}, [timing])


# --- A finished curve, as an input of eval_path. -----------------------------------


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


def check_curve_ends(record: dict, workdir: str, ends: dict, start_run: runs.TrainedModel,
                     end_run: runs.TrainedModel) -> dict:
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


def curve_label(record: dict) -> str:
  """'bezier (fit on clean data)' or 'bezier (fit on cue data, p=1.0)'."""
  data = record["fit_data"]
  on = ("clean data" if data["cue_proportion"] == 0 else
        f"{data['cue']} data, p={data['cue_proportion']}")
  return f"{record['kind']} (fit on {on})"
