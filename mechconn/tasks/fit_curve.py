"""The `fit_curve` task: a Bezier curve (or polygonal chain) between two finished train runs.

t = 0 is the cue model's run (`start_workdir`), t = 1 the no-cue model's
(`end_workdir`); the free control point(s) are fitted on the config's data
(e.g. clean data, or cue data at proportion 1), checkpointed and resumable
like training. Writes curve.json (the curve's provenance and last train loss);
`eval_path` evaluates it.
"""

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections

from mechconn import config_checks as checks
from mechconn import curves
from mechconn import dry_run as dry_run_lib
from mechconn import loop
from mechconn import mesh as mesh_lib
from mechconn import rngs
from mechconn import step as step_lib
from mechconn import workdir as workdir_lib
from mechconn.data import steps as data_steps
from mechconn.tasks import data as task_data
from mechconn.tasks import optim
from mechconn.tasks import runner
from mechconn.tasks import runs
from mechconn.tasks import specs

NAME = "fit_curve"
CURVE_FILE = runs.CURVE_FILE
LAYOUT = dataclasses.replace(loop.LAYOUT, files=loop.LAYOUT.files + (CURVE_FILE,))


@dataclasses.dataclass(frozen=True)
class CurveSpec:
  """The curve's shape: a Bezier curve or polygonal chain with `num_free` free points."""

  kind: str
  num_free: int
  init: str  # fresh (a new init) or linear (on the segment)


@dataclasses.dataclass(frozen=True)
class FitCurveSpec:
  """A `fit_curve` config, resolved."""

  seed: int  # the free points' init and the step's t
  data: specs.ImageData  # what the curve is fitted on
  endpoints: runs.EndpointsSpec
  curve: CurveSpec
  loop: specs.LoopSpec
  dry_run: bool


def resolve(config: ml_collections.ConfigDict, num_devices: int) -> FitCurveSpec:
  """A `fit_curve` config, checked before any work (ValueError naming the key)."""
  checks.check_int(config.seed, "seed")
  data = specs.data_spec(config.data, NAME)
  checks.check_choice(config.curve.kind, curves.CURVE_KINDS, "curve.kind")
  checks.check_choice(config.curve.init, curves.INITS, "curve.init")
  checks.check_positive_int(config.curve.num_free, "curve.num_free")
  return FitCurveSpec(
      seed=config.seed, data=data, endpoints=runs.endpoints_spec(config, data),
      curve=CurveSpec(kind=config.curve.kind, num_free=config.curve.num_free,
                      init=config.curve.init),
      loop=specs.loop_spec(config, num_devices, data.num_train_examples),
      dry_run=config.dry_run)


def inputs(spec: FitCurveSpec, dry_run: bool) -> tuple[runs.Endpoints, dict]:
  """The end points' finished train runs (fresh stand-ins in a dry run before they exist)."""
  return runs.load_endpoints(spec.endpoints, spec.data, dry_run)


def build(spec: FitCurveSpec, mesh: jax.sharding.Mesh, endpoints: runs.Endpoints
          ) -> runner.Build:
  """The curve loss between the end points, the optimiser, the free points' init and step.

  Keys: fresh free points from `fold_in(rngs.init_key(seed), k)`, the step's
  t from `rngs.step_key(seed)`.
  """
  start, end = endpoints.start, endpoints.end
  steps_per_epoch, num_steps = spec.loop.steps(spec.data.num_train_examples)
  tx, schedule = optim.make_optimizer(spec.loop.optimizer, num_steps=num_steps,
                                      steps_per_epoch=steps_per_epoch)
  model = start.model
  loss_fn = mesh_lib.replicate(curves.CurveLoss(model.apply, spec.curve.kind, start.params,
                                                end.params, start.batch_stats), mesh)
  init_key = rngs.init_key(spec.seed)
  image_shape = spec.data.input_shape
  sample = jnp.zeros((1, *image_shape), jnp.float32)
  num_free = spec.curve.num_free

  def init_fn():
    fresh = [model.init(jax.random.fold_in(init_key, k), sample)["params"]
             for k in range(num_free)]
    free = curves.init_free_points(loss_fn.start, loss_fn.end, num_free, spec.curve.init,
                                   fresh)
    return step_lib.fresh_state(free, tx)

  step_fn = functools.partial(step_lib.train_step,
                              root_key=mesh_lib.replicate(rngs.step_key(spec.seed), mesh),
                              loss_fn=loss_fn, tx=tx)
  return runner.Build(name=f"fit {spec.curve.kind}", init_fn=init_fn, step_fn=step_fn,
                      batch_size=spec.loop.batch_size, steps_per_epoch=steps_per_epoch,
                      num_steps=num_steps, image_shape=image_shape, schedule=schedule,
                      model=model)


def run(spec: FitCurveSpec, job: runner.Job) -> dict:
  """Fits the curve; returns the curve.json record."""
  endpoints, workdir = job.inputs, job.workdir
  built = build(spec, job.mesh, endpoints)
  split = task_data.load_train_split(spec.data)
  start = time.perf_counter()
  step_fn, batch_fn = data_steps.loop_inputs_for(built.step_fn, split, built.batch_size,
                                                 spec.seed, job.mesh, spec.data.pipeline)
  state = loop.train_loop(
      built.init_fn, step_fn, batch_fn, workdir,
      spec.loop.options(built.num_steps, built.steps_per_epoch, built.name),
      mesh=job.mesh, learning_rate_fn=built.schedule, examples_per_step=built.batch_size,
      run_config=job.config_dict)
  last = [r for r in workdir_lib.read_metrics(os.path.join(workdir, workdir_lib.METRICS_FILE))
          if "train/loss" in r]
  data = spec.data
  record = {
      "kind": spec.curve.kind,
      "num_free": spec.curve.num_free,
      "step": int(state.step),
      "start_checkpoint": endpoints.start.checkpoint,
      "end_checkpoint": endpoints.end.checkpoint,
      "fit_data": {"dataset": data.dataset, "cue": data.cue,
                   "cue_proportion": data.cue_proportion, "num_train": len(split)},
      "final_train_loss": last[-1]["train/loss"] if last else None,
      "seconds_this_session": round(time.perf_counter() - start, 1),
      "config": job.config_dict,
  }
  runner.write_outputs(workdir, {CURVE_FILE: record})
  print(f"fitted a {spec.curve.kind} curve ({spec.curve.num_free} free point(s)) on "
        f"{data.dataset} p={data.cue_proportion}; last train loss "
        f"{record['final_train_loss']:.4f}")
  return record


def dry_run(spec: FitCurveSpec, job: runner.Job) -> dict:
  """One timed curve step of `build`'s step function, the fit's estimate."""
  built = build(spec, job.mesh, job.inputs)
  state, timing, batch = runner.time_build(built, job.mesh)
  return dry_run_lib.report(
      f"fit_curve: {spec.curve.kind} with {spec.curve.num_free} free point(s) of "
      f"{type(built.model).__name__} on {spec.data.label}; end points: {job.inputs.source}",
      job.mesh, {"curve state": state, "batch": batch}, [timing])
