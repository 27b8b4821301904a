"""The `train` task: a model on a cued dataset, evaluated on the four counterfactual views.

On a sequence dataset (`tasks.sequences.DATASETS`, e.g. 'recall') it trains a
causal language model on the masked next-token loss instead, evaluated on the
held-out sequences (one eval set, 'test': next-token loss and the accuracy
over the masked targets).

Writes into its workdir: config.json, checkpoints/<step>/ (orbax),
metrics.jsonl (train metrics every log step, view metrics every eval step)
and final_eval.json (view losses and accuracies of the last step). Resumes
from the latest checkpoint when the workdir holds a run of the same config.
"""

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections

from mechconn import config_checks as checks
from mechconn import counterfactual
from mechconn import dry_run as dry_run_lib
from mechconn import loop
from mechconn import mesh as mesh_lib
from mechconn import objectives
from mechconn import rngs
from mechconn import step as step_lib
from mechconn.data import steps as data_steps
from mechconn.tasks import data as task_data
from mechconn.tasks import optim
from mechconn.tasks import runner
from mechconn.tasks import runs
from mechconn.tasks import sequences as task_sequences
from mechconn.tasks import specs

NAME = "train"
FINAL_EVAL_FILE = runs.FINAL_EVAL_FILE
LAYOUT = dataclasses.replace(loop.LAYOUT, files=loop.LAYOUT.files + (FINAL_EVAL_FILE,))


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """A `train` config, resolved."""

  seed: int  # model init, data order and step randomness
  data: specs.DataSpec
  model: specs.ModelSpec
  loop: specs.LoopSpec
  eval_batch_size: int
  eval_every_steps: int  # 0: only at the end
  dry_run: bool


def resolve(config: ml_collections.ConfigDict, num_devices: int) -> TrainSpec:
  """A `train` config, checked before any work (ValueError naming the key).

  Checks names against the valid choices (datasets, cue kinds, models,
  optimisers, schedules), every number's range (finite; cue_proportion in
  [0, 1], momentum in [0, 1), positive learning rate, non-negative weight
  decay), positive sizes and periods, batch sizes divisible by the device
  count, that the model accepts its kwargs, that the batch fits the data and
  that a warm-up ends before the run does.
  """
  checks.check_int(config.seed, "seed")
  data = specs.data_spec(config.data, NAME)
  model = specs.model_spec(config.model, dataset=data.dataset)
  loop_spec = specs.loop_spec(config, num_devices, data.num_train_examples)
  checks.check_int(config.eval_every_steps, "eval_every_steps",
                   hint=" (0: evaluate only at the end)")
  return TrainSpec(seed=config.seed, data=data, model=model, loop=loop_spec,
                   eval_batch_size=specs.eval_batch_size(config.eval_batch_size, num_devices),
                   eval_every_steps=config.eval_every_steps, dry_run=config.dry_run)


def build(spec: TrainSpec, mesh: jax.sharding.Mesh) -> runner.Build:
  """The model, optimiser, fresh state and jitted step of a `train` config.

  Keys: the init from `rngs.init_key(seed)`, the steps from
  `rngs.step_key(seed)` (replicated over the mesh). A language model's
  "image shape" is [L]: its dry run's zero batches become PAD tokens
  (`tasks.sequences.as_sequences`).
  """
  steps_per_epoch, num_steps = spec.loop.steps(spec.data.num_train_examples)
  model = spec.model.build()
  tx, schedule = optim.make_optimizer(spec.loop.optimizer, num_steps=num_steps,
                                      steps_per_epoch=steps_per_epoch)
  image_shape = spec.data.input_shape
  init_key = rngs.init_key(spec.seed)
  if spec.data.is_sequence:
    sample = jnp.zeros((1, *image_shape), jnp.int32)
    init_fn = functools.partial(task_sequences.init_state, model, tx, init_key, sample)
    loss_fn = step_lib.NextTokenLoss(spec.model.apply_fn(model))
    to_batch = task_sequences.as_sequences
  else:
    sample = jnp.zeros((1, *image_shape), jnp.float32)
    init_fn = functools.partial(step_lib.create_train_state, model, tx, init_key, sample)
    loss_fn = step_lib.ClassificationLoss(model.apply)
    to_batch = lambda batch: batch  # the zero image batch itself
  step_fn = functools.partial(step_lib.train_step,
                              root_key=mesh_lib.replicate(rngs.step_key(spec.seed), mesh),
                              loss_fn=loss_fn, tx=tx)
  return runner.Build(name=f"train {spec.model.name}", init_fn=init_fn, step_fn=step_fn,
                      batch_size=spec.loop.batch_size, steps_per_epoch=steps_per_epoch,
                      num_steps=num_steps, image_shape=image_shape, schedule=schedule,
                      model=model, to_batch=to_batch)


def _eval_data(spec: TrainSpec, mesh: jax.sharding.Mesh) -> tuple:
  """(training split, eval sets, their number of examples, objective): the four views of
  the test split, or a language model's held-out sequences."""
  if spec.data.is_sequence:
    return (task_sequences.load_split(spec.data, "train"),
            task_sequences.eval_sets(spec.data, spec.eval_batch_size, mesh),
            spec.data.num_test, task_sequences.OBJECTIVE)
  split, test_views, test_labels = task_data.load_data(spec.data)
  return (split, task_data.shard_views(test_views, test_labels, spec.eval_batch_size, mesh),
          len(test_labels), objectives.CLASSIFICATION)


def run(spec: TrainSpec, job: runner.Job) -> dict:
  """Trains and evaluates; returns the final_eval record (also written to the workdir)."""
  mesh = job.mesh
  built = build(spec, mesh)
  # Data: every host builds the same split and takes its rows of each batch.
  split, eval_sets, num_test, objective = _eval_data(spec, mesh)
  apply_fn = spec.model.apply_fn(built.model)
  eval_fn = runs.view_eval_fn(lambda state: (apply_fn, state.variables), eval_sets, objective)

  start = time.perf_counter()
  step_fn, batch_fn = data_steps.loop_inputs_for(built.step_fn, split, built.batch_size,
                                                 spec.seed, mesh, spec.data.pipeline)
  state = loop.train_loop(
      built.init_fn, step_fn, batch_fn, job.workdir,
      spec.loop.options(built.num_steps, built.steps_per_epoch, built.name,
                        eval_every=spec.eval_every_steps),
      mesh=mesh, learning_rate_fn=built.schedule, eval_fn=eval_fn,
      examples_per_step=built.batch_size, run_config=job.config_dict)
  seconds = time.perf_counter() - start

  record = {
      "step": int(state.step),
      "views": runs.views_of(eval_fn(state)),
      "checkpoint": os.path.join(os.path.abspath(job.workdir), loop.CHECKPOINT_DIR,
                                 str(int(state.step))),
      "num_train": len(split),
      "num_test": int(num_test),
      "devices": int(mesh.devices.size),
      "backend": jax.default_backend(),
      "seconds_this_session": round(seconds, 1),
      "config": job.config_dict,
  }
  title = f"{spec.model.name} on {spec.data.label}, step {record['step']}:"
  if spec.data.is_sequence:
    test = record["views"][task_sequences.EVAL_SET]
    print(f"{title}\nheld-out next-token loss {test['loss']:.4f}, accuracy over the masked "
          f"targets {test['accuracy']:.4f}")
  else:
    print(counterfactual.format_view_table(record["views"], title))
  runner.write_outputs(job.workdir, {FINAL_EVAL_FILE: record})
  return record


def dry_run(spec: TrainSpec, job: runner.Job) -> dict:
  """Mesh, placement, one timed step of `build`'s step function, the run's estimate."""
  built = build(spec, job.mesh)
  state, timing, batch = runner.time_build(built, job.mesh)
  return dry_run_lib.report(
      f"train {spec.model.name} {dict(spec.model.kwargs)} on {spec.data.label}",
      job.mesh, {"train state": state, "batch": batch}, [timing])
