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
from typing import Any

import jax
import jax.numpy as jnp

from mechconn import config_checks as checks
from mechconn import counterfactual
from mechconn import dry_run as dry_run_lib
from mechconn import loop
from mechconn import mesh as mesh_lib
from mechconn import objectives
from mechconn import rngs
from mechconn import step as step_lib
from mechconn.tasks import config as task_config
from mechconn.tasks import data as task_data
from mechconn.tasks import runner
from mechconn.tasks import runs
from mechconn.tasks import sequences as task_sequences

NAME = "train"
FINAL_EVAL_FILE = runs.FINAL_EVAL_FILE
LAYOUT = dataclasses.replace(loop.LAYOUT, files=loop.LAYOUT.files + (FINAL_EVAL_FILE,))


def check(config: Any, num_devices: int) -> None:
  """Validates a `train` config before any work; raises ValueError naming the key.

  Checks names against the valid choices (datasets, cue kinds, models,
  optimisers, schedules), every number's range (finite; cue_proportion in
  [0, 1], momentum in [0, 1), positive learning rate, non-negative weight
  decay), positive sizes and periods, batch sizes divisible by the device
  count, that the model accepts its kwargs, that the batch fits the data and
  that a warm-up ends before the run does.
  """
  checks.check_int(config.seed, "seed")
  task_config.check_data_config(config.data, task=NAME)
  task_config.check_model_config(config.model, dataset=config.data.dataset)
  task_config.check_loop_config(config, num_devices)
  _, num_steps = task_config.steps_of(task_config.batch_size_of(config, num_devices),
                                      config.num_epochs,
                                      task_config.num_train_examples(config.data))
  task_config.check_warmup(config.optimizer, num_steps)


def inputs(config: Any, dry_run: bool) -> tuple[None, None]:
  """A train run reads no finished run."""
  del config, dry_run
  return None, None


def build(config: Any, mesh: jax.sharding.Mesh, inputs: Any = None) -> runner.Build:
  """The model, optimiser, fresh state and jitted step of a `train` config.

  Keys: the init from `rngs.init_key(seed)`, the steps from
  `rngs.step_key(seed)` (replicated over the mesh). A language model's
  "image shape" is [L]: its dry run's zero batches become PAD tokens
  (`tasks.sequences.as_sequences`).
  """
  del inputs
  batch_size = task_config.batch_size_of(config, mesh.devices.size)
  steps_per_epoch, num_steps = task_config.steps_of(
      batch_size, config.num_epochs, task_config.num_train_examples(config.data))
  model = runs.model_of(config.model, config.data.dataset)
  tx, schedule = task_config.make_optimizer(config.optimizer, num_steps=num_steps,
                                            steps_per_epoch=steps_per_epoch)
  image_shape = task_config.input_shape(config.data)
  init_key = rngs.init_key(config.seed)
  if task_sequences.is_sequence_data(config.data.dataset):
    sample = jnp.zeros((1, *image_shape), jnp.int32)
    init_fn = functools.partial(task_sequences.init_state, model, tx, init_key, sample)
    loss_fn = step_lib.NextTokenLoss(runs.apply_fn_of(model, config.data.dataset))
    to_batch = task_sequences.as_sequences
  else:
    sample = jnp.zeros((1, *image_shape), jnp.float32)
    init_fn = functools.partial(step_lib.create_train_state, model, tx, init_key, sample)
    loss_fn = step_lib.ClassificationLoss(model.apply)
    to_batch = lambda batch: batch  # the zero image batch itself
  step_fn = functools.partial(step_lib.train_step,
                              root_key=mesh_lib.replicate(rngs.step_key(config.seed), mesh),
                              loss_fn=loss_fn, tx=tx)
  return runner.Build(name=f"train {config.model.name}", init_fn=init_fn, step_fn=step_fn,
                      batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                      num_steps=num_steps, image_shape=image_shape, schedule=schedule,
                      model=model, to_batch=to_batch)


def run(config: Any, workdir: str, mesh: jax.sharding.Mesh, inputs: Any,
        config_dict: dict, *, overwrite: bool = False) -> dict:
  """Trains and evaluates; returns the final_eval record (also written to the workdir)."""
  del overwrite  # the claim, made by runner.launch, already used it
  built = build(config, mesh, inputs)
  data = config.data
  # Data: every host builds the same split and takes its rows of each batch. Evaluated
  # on the four views of the test split, or a language model on its held-out sequences.
  if task_sequences.is_sequence_data(data.dataset):
    split = task_sequences.load_split(data, "train")
    eval_sets = task_sequences.eval_sets(data, config.eval_batch_size, mesh)
    num_test, objective = data.num_test, task_sequences.OBJECTIVE
  else:
    split, test_views, test_labels = task_data.load_data(data)
    eval_sets = task_data.shard_views(test_views, test_labels, config.eval_batch_size, mesh)
    num_test, objective = len(test_labels), objectives.CLASSIFICATION
  apply_fn = runs.apply_fn_of(built.model, data.dataset)
  eval_fn = runs.view_eval_fn(lambda state: (apply_fn, state.variables), eval_sets, objective)

  start = time.perf_counter()
  step_fn, batch_fn = task_data.loop_inputs_for(built.step_fn, split, built.batch_size,
                                                config.seed, mesh,
                                                config.data.get("pipeline", "auto"))
  state = loop.train_loop(
      built.init_fn, step_fn, batch_fn, workdir,
      task_config.loop_options(config, built.num_steps, built.steps_per_epoch, built.name),
      mesh=mesh, learning_rate_fn=built.schedule, eval_fn=eval_fn,
      examples_per_step=built.batch_size, run_config=config_dict)
  seconds = time.perf_counter() - start

  record = {
      "step": int(state.step),
      "views": runs.views_of(eval_fn(state)),
      "checkpoint": os.path.join(os.path.abspath(workdir), loop.CHECKPOINT_DIR,
                                 str(int(state.step))),
      "num_train": len(split),
      "num_test": int(num_test),
      "devices": int(mesh.devices.size),
      "backend": jax.default_backend(),
      "seconds_this_session": round(seconds, 1),
      "config": config_dict,
  }
  title = f"{config.model.name} on {_data_label(data)}, step {record['step']}:"
  if task_sequences.is_sequence_data(data.dataset):
    test = record["views"][task_sequences.EVAL_SET]
    print(f"{title}\nheld-out next-token loss {test['loss']:.4f}, accuracy over the masked "
          f"targets {test['accuracy']:.4f}")
  else:
    print(counterfactual.format_view_table(record["views"], title))
  runner.write_outputs(workdir, {FINAL_EVAL_FILE: record})
  return record


def dry_run(config: Any, mesh: jax.sharding.Mesh, inputs: Any) -> dict:
  """Mesh, placement, one timed step of `build`'s step function, the run's estimate."""
  built = build(config, mesh, inputs)
  state, timing, batch = runner.time_build(built, mesh)
  return dry_run_lib.report(
      f"train {config.model.name} {dict(config.model.kwargs)} on {_data_label(config.data)}",
      mesh, {"train state": state, "batch": batch}, [timing])


def _data_label(data: Any) -> str:
  """'shapes10 (box, p=0.8)'; a sequence dataset by its name."""
  if task_sequences.is_sequence_data(data.dataset):
    return data.dataset
  return f"{data.dataset} ({data.cue}, p={data.cue_proportion})"
