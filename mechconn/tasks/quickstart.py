"""The `quickstart` task: two small models from different seeds, and the linear path between.

Trains on the embedded prototype-image task (`data.prototypes`, seconds on a
CPU), in memory (`loop.fit`: no checkpoints; a relaunch retrains, with the
same numbers), evaluates the linear path at `path.num_t` points with BatchNorm
statistics recomputed at each, and writes `linear_barrier.json`.
"""

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mechconn import barriers
from mechconn import config_checks as checks
from mechconn import loop
from mechconn import workdir as workdir_lib
from mechconn.data import batching
from mechconn.data import prototypes
from mechconn.models import get_model
from mechconn.tasks import config as task_config
from mechconn.tasks import data as task_data
from mechconn.tasks import runner

NAME = "quickstart"
RESULT_FILE = "linear_barrier.json"
LAYOUT = workdir_lib.Layout(files=(RESULT_FILE,))


def check(config: Any, num_devices: int) -> None:
  """Validates a quickstart config before any work, naming the field."""
  del num_devices  # `fit` trains on one device
  checks.check_int(config.seed, "seed")
  data = config.data
  checks.check_int(data.num_classes, "data.num_classes", minimum=2)
  checks.check_int(data.image_size, "data.image_size", minimum=4)
  checks.check_number(data.noise, "data.noise", low=0.0)
  for key in ("num_train", "num_test"):
    checks.check_positive_int(data[key], f"data.{key}")
  for key in ("train_seed", "test_seed"):
    checks.check_int(data[key], f"data.{key}")
  task_config.check_model_config(config.model)
  task_config.check_optimizer_config(config.optimizer)
  for key in ("batch_size", "num_epochs", "eval_batch_size"):
    checks.check_positive_int(config[key], key)
  checks.check_int(config.path.num_t, "path.num_t", minimum=2)
  checks.check_positive_int(config.path.bn_examples, "path.bn_examples")
  task_config.check_bn_variance(config.path, get_model(config.model.name, data.num_classes,
                                                       **config.model.kwargs),
                                (data.image_size, data.image_size, 3))
  task_config.steps_of(config.batch_size, config.num_epochs, data.num_train)
  if config.path.bn_examples < config.eval_batch_size:
    raise ValueError(f"config.path.bn_examples={config.path.bn_examples} makes no full batch "
                     f"of eval_batch_size={config.eval_batch_size}.")
  if config.path.bn_examples > data.num_train:
    raise ValueError(f"config.path.bn_examples={config.path.bn_examples} exceeds "
                     f"config.data.num_train={data.num_train}.")


def inputs(config: Any, dry_run: bool) -> tuple[None, None]:
  """The quickstart reads no finished run."""
  del config, dry_run
  return None, None


def build(config: Any, mesh: jax.sharding.Mesh | None = None, inputs: Any = None
          ) -> runner.Build:
  """The model and optimiser both seeds train with (`loop.fit` makes their states)."""
  del mesh, inputs
  data = config.data
  steps_per_epoch, num_steps = task_config.steps_of(config.batch_size, config.num_epochs,
                                                    data.num_train)
  tx, schedule = task_config.make_optimizer(config.optimizer, num_steps=num_steps,
                                            steps_per_epoch=steps_per_epoch)
  dtype = config.model.get("dtype", "float32")
  model = get_model(config.model.name, data.num_classes, **config.model.kwargs,
                    dtype=None if dtype == "float32" else jnp.dtype(dtype))
  return runner.Build(name="quickstart", init_fn=None, step_fn=None, tx=tx,
                      batch_size=config.batch_size, steps_per_epoch=steps_per_epoch,
                      num_steps=num_steps, image_shape=(data.image_size, data.image_size, 3),
                      schedule=schedule, model=model)


def run(config: Any, workdir: str, mesh: jax.sharding.Mesh, inputs: Any, config_dict: dict,
        *, overwrite: bool = False) -> dict:
  """Trains the two models and evaluates the path; returns the linear_barrier.json record."""
  del overwrite  # the claim, made by runner.launch, already used it
  built = build(config, mesh, inputs)
  data = config.data
  train_x, train_y = prototypes.make_prototype_images(
      data.train_seed, data.num_train, num_classes=data.num_classes,
      image_size=data.image_size, noise=data.noise)
  test_x, test_y = prototypes.make_prototype_images(
      data.test_seed, data.num_test, num_classes=data.num_classes,
      image_size=data.image_size, noise=data.noise)

  start = time.perf_counter()
  states = []
  for i in range(2):
    state, history = loop.fit(built.model, built.tx, train_x, train_y,
                              batch_size=config.batch_size, num_epochs=config.num_epochs,
                              seed=config.seed + i, desc=f"model {i}")
    print(f"model {i}: final epoch train loss {history[-1]['loss']:.4f}, "
          f"train accuracy {history[-1]['accuracy']:.4f}")
    states.append(state)
  train_seconds = time.perf_counter() - start

  eval_batches = batching.stack_batches(test_x, test_y, config.eval_batch_size)
  n = config.path.bn_examples
  bn_batches = task_data.bn_batches_of({"image": train_x[:n], "label": train_y[:n]},
                                       config.eval_batch_size)
  has_bn = bool(states[0].batch_stats)
  ts = np.linspace(0.0, 1.0, config.path.num_t)
  start = time.perf_counter()
  result = jax.device_get(barriers.evaluate_path(
      built.model.apply, (states[0].params, states[1].params), ts, eval_batches,
      bn_batches=bn_batches if has_bn else None,
      renormalize=task_config.renormalize_of(config.path)))
  eval_seconds = time.perf_counter() - start

  record = {
      "path": "linear",
      "ts": np.asarray(result.ts).tolist(),
      "loss": np.asarray(result.loss).tolist(),
      "accuracy": np.asarray(result.accuracy).tolist(),
      "summary": result.summary(),
      "batchnorm_recomputed_from": (
          f"{bn_batches['image'].shape[0] * bn_batches['image'].shape[1]} training examples"
          if has_bn else None),
      "eval_examples": int(len(test_x)),
      "seeds": [config.seed, config.seed + 1],
      "train_seconds": round(train_seconds, 2),
      "path_eval_seconds": round(eval_seconds, 2),
      "backend": jax.default_backend(),
      "config": config_dict,
  }
  print(format_path_table(record))
  runner.write_outputs(workdir, {RESULT_FILE: record})
  print(f"wrote {os.path.join(workdir, RESULT_FILE)}")
  return record


def dry_run(config: Any, mesh: jax.sharding.Mesh, inputs: Any) -> dict:
  del config, mesh, inputs
  raise ValueError("The quickstart has no dry run: the whole run takes seconds.")


def format_path_table(record: dict) -> str:
  """A plain-text table of t, loss and accuracy, with the barriers below it."""
  lines = ["     t     loss  accuracy"]
  for t, loss, acc in zip(record["ts"], record["loss"], record["accuracy"]):
    lines.append(f"{t:6.3f} {loss:8.4f} {acc:9.4f}")
  summary = record["summary"]
  lines.append(f"loss barrier  {summary['loss']:.4f} (at t = {summary['loss_t']:.3f})")
  lines.append(f"error barrier {summary['error']:.4f}")
  return "\n".join(lines)
