"""The `train` task: a model on a cued dataset, evaluated on the four counterfactual views.

Writes into its workdir: config.json, checkpoints/<step>/ (orbax),
metrics.jsonl (train metrics every log step, view metrics every eval step)
and final_eval.json (view losses and accuracies of the last step). Resumes
from the latest checkpoint when the workdir holds a run of the same config.
"""

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from mechconn import config_checks as checks
from mechconn import counterfactual
from mechconn import dry_run as dry_run_lib
from mechconn import loop
from mechconn import mesh as mesh_lib
from mechconn import rngs
from mechconn import step as step_lib
from mechconn.tasks import config as task_config
from mechconn.tasks import data as task_data
from mechconn.tasks import runner
from mechconn.tasks import runs

NAME = "train"
FINAL_EVAL_FILE = runs.FINAL_EVAL_FILE
LAYOUT = dataclasses.replace(loop.LAYOUT, files=loop.LAYOUT.files + (FINAL_EVAL_FILE,))


def check(config: Any, num_devices: int) -> None:
  """Validates a `train` config before any work; raises ValueError naming the key.

  Checks names against the valid choices (datasets, cue kinds, models,
  optimisers, schedules), every number's range (finite; cue_proportion in
  [0, 1], momentum in [0, 1), positive learning rate, non-negative weight
  decay), positive sizes and periods, batch sizes divisible by the device
  count, that the model accepts its kwargs, and that the batch fits the data.
  """
  checks.check_int(config.seed, "seed")
  task_config.check_data_config(config.data)
  task_config.check_model_config(config.model)
  task_config.check_loop_config(config, num_devices)
  task_config.steps_of(task_config.batch_size_of(config, num_devices), config.num_epochs,
                       task_config.num_train_examples(config.data))


def inputs(config: Any, dry_run: bool) -> tuple[None, None]:
  """A train run reads no finished run."""
  del config, dry_run
  return None, None


def build(config: Any, mesh: jax.sharding.Mesh, inputs: Any = None) -> runner.Build:
  """The model, optimiser, fresh state and jitted step of a `train` config.

  Keys: the init from `rngs.init_key(seed)`, the steps from
  `rngs.step_key(seed)` (replicated over the mesh).
  """
  del inputs
  batch_size = task_config.batch_size_of(config, mesh.devices.size)
  steps_per_epoch, num_steps = task_config.steps_of(
      batch_size, config.num_epochs, task_config.num_train_examples(config.data))
  model = runs.model_of(config.model, config.data.dataset)
  tx, schedule = task_config.make_optimizer(config.optimizer, num_steps=num_steps,
                                            steps_per_epoch=steps_per_epoch)
  image_shape = task_config.input_shape(config.data)
  sample = jnp.zeros((1, *image_shape), jnp.float32)
  init_fn = functools.partial(step_lib.create_train_state, model, tx,
                              rngs.init_key(config.seed), sample)
  step_fn = functools.partial(step_lib.train_step,
                              root_key=mesh_lib.replicate(rngs.step_key(config.seed), mesh),
                              loss_fn=step_lib.ClassificationLoss(model.apply), tx=tx)
  return runner.Build(name=f"train {config.model.name}", init_fn=init_fn, step_fn=step_fn,
                      batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                      num_steps=num_steps, image_shape=image_shape, schedule=schedule,
                      model=model)


def run(config: Any, workdir: str, mesh: jax.sharding.Mesh, inputs: Any,
        config_dict: dict, *, overwrite: bool = False) -> dict:
  """Trains and evaluates; returns the final_eval record (also written to the workdir)."""
  del overwrite  # the claim, made by runner.launch, already used it
  built = build(config, mesh, inputs)
  # Data: every host builds the same split and takes its rows of each batch.
  split, test_views, test_labels = task_data.load_data(config.data)
  view_batches = task_data.shard_views(test_views, test_labels, config.eval_batch_size, mesh)
  eval_fn = runs.view_eval_fn(lambda state: (built.model.apply, state.variables), view_batches)

  start = time.perf_counter()
  step_fn, batch_fn = task_data.loop_inputs_for(built.step_fn, split, built.batch_size,
                                                config.seed, mesh,
                                                config.data.get("pipeline", "auto"))
  state = loop.train_loop(
      built.init_fn, step_fn, batch_fn, workdir,
      task_config.loop_options(config, built.num_steps, built.steps_per_epoch, built.name),
      mesh=mesh, learning_rate_fn=built.schedule, eval_fn=eval_fn,
      examples_per_step=built.batch_size)
  seconds = time.perf_counter() - start

  record = {
      "step": int(state.step),
      "views": runs.views_of(eval_fn(state)),
      "checkpoint": os.path.join(os.path.abspath(workdir), loop.CHECKPOINT_DIR,
                                 str(int(state.step))),
      "num_train": len(split),
      "num_test": int(len(test_labels)),
      "devices": int(mesh.devices.size),
      "backend": jax.default_backend(),
      "seconds_this_session": round(seconds, 1),
      "config": config_dict,
  }
  data = config.data
  print(counterfactual.format_view_table(
      record["views"], f"{config.model.name} on {data.dataset} ({data.cue}, "
      f"p={data.cue_proportion}), step {record['step']}:"))
  runner.write_outputs(workdir, {FINAL_EVAL_FILE: record})
  return record


def dry_run(config: Any, mesh: jax.sharding.Mesh, inputs: Any) -> dict:
  """Mesh, placement, one timed step of `build`'s step function, the run's estimate."""
  built = build(config, mesh, inputs)
  state, timing, batch = runner.time_build(built, mesh)
  data = config.data
  return dry_run_lib.report(
      f"train {config.model.name} {dict(config.model.kwargs)} on {data.dataset} "
      f"({data.cue}, p={data.cue_proportion})", mesh,
      {"train state": state, "batch": batch}, [timing])
