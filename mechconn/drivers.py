"""Drivers: whole jobs built from the library, called by experiments/main.py.

A driver takes a config object (any attribute container, e.g. an
ml_collections.ConfigDict) and a workdir. It never parses files.
"""

import os
import time
from typing import Any

import jax
import numpy as np

from mechconn import barriers
from mechconn import config_checks as checks
from mechconn import train
from mechconn import workdir as workdir_lib
from mechconn.data import batching
from mechconn.data import prototypes
from mechconn.models import get_model

RESULT_FILE = "linear_barrier.json"
LAYOUT = workdir_lib.Layout(files=(RESULT_FILE,))


def check_quickstart_config(config: Any) -> None:
  """Validates a quickstart (`linear_barrier`) config before any work, naming the field."""
  checks.check_int(config.seed, "seed")
  data = config.data
  checks.check_int(data.num_classes, "data.num_classes", minimum=2)
  checks.check_int(data.image_size, "data.image_size", minimum=4)
  checks.check_number(data.noise, "data.noise", low=0.0)
  for key in ("num_train", "num_test"):
    checks.check_positive_int(data[key], f"data.{key}")
  for key in ("train_seed", "test_seed"):
    checks.check_int(data[key], f"data.{key}")
  train.check_model_config(config.model)
  for key in ("batch_size", "num_epochs", "eval_batch_size", "bn_batches"):
    checks.check_positive_int(config[key], key)
  checks.check_number(config.learning_rate, "learning_rate", low=0.0, low_open=True)
  checks.check_number(config.momentum, "momentum", low=0.0, high=1.0, high_open=True)
  checks.check_number(config.weight_decay, "weight_decay", low=0.0)
  checks.check_int(config.num_t, "num_t", minimum=2)
  train.steps_of(config, data.num_train)
  if config.bn_batches * config.eval_batch_size > data.num_train:
    raise ValueError(f"config.bn_batches={config.bn_batches} batches of eval_batch_size="
                     f"{config.eval_batch_size} need {config.bn_batches * config.eval_batch_size}"
                     f" training examples; config.data.num_train is {data.num_train}.")


def linear_barrier(config: Any, workdir: str, *, overwrite: bool = False) -> dict:
  """Trains two models from different seeds and evaluates the linear path between them.

  Writes `linear_barrier.json` (curves, barriers, config) into workdir and
  returns the same record. The config is validated first; a workdir holding a
  run of a different config is refused unless overwrite=True.
  """
  check_quickstart_config(config)
  with train.claimed(config, workdir, LAYOUT, overwrite) as config_dict:
    return _linear_barrier(config, workdir, config_dict)


def _linear_barrier(config: Any, workdir: str, config_dict: dict) -> dict:
  out_path = os.path.join(workdir, RESULT_FILE)
  data = config.data
  train_x, train_y = prototypes.make_prototype_images(
      data.train_seed, data.num_train, num_classes=data.num_classes,
      image_size=data.image_size, noise=data.noise)
  test_x, test_y = prototypes.make_prototype_images(
      data.test_seed, data.num_test, num_classes=data.num_classes,
      image_size=data.image_size, noise=data.noise)
  model = get_model(config.model.name, data.num_classes, **config.model.kwargs)
  steps = config.num_epochs * (data.num_train // config.batch_size)
  tx = train.sgd_cosine(config.learning_rate, steps, momentum=config.momentum,
                        weight_decay=config.weight_decay)

  start = time.perf_counter()
  states = []
  for i in range(2):
    state, history = train.fit(model, tx, train_x, train_y, batch_size=config.batch_size,
                               num_epochs=config.num_epochs, seed=config.seed + i,
                               desc=f"model {i}")
    print(f"model {i}: final epoch train loss {history[-1]['loss']:.4f}, "
          f"train accuracy {history[-1]['accuracy']:.4f}")
    states.append(state)
  train_seconds = time.perf_counter() - start

  eval_batches = batching.stack_batches(test_x, test_y, config.eval_batch_size)
  bn_batches = batching.stack_batches(
      train_x[:config.bn_batches * config.eval_batch_size],
      train_y[:config.bn_batches * config.eval_batch_size],
      config.eval_batch_size, drop_remainder=True)
  has_bn = bool(states[0].batch_stats)
  ts = np.linspace(0.0, 1.0, config.num_t)
  start = time.perf_counter()
  result = barriers.evaluate_path(model.apply, (states[0].params, states[1].params), ts,
                                  eval_batches, bn_batches=bn_batches if has_bn else None)
  result = jax.device_get(result)
  eval_seconds = time.perf_counter() - start

  record = {
      "path": "linear",
      "ts": np.asarray(result.ts).tolist(),
      "loss": np.asarray(result.loss).tolist(),
      "accuracy": np.asarray(result.accuracy).tolist(),
      "loss_barrier": float(barriers.barrier_height(result.ts, result.loss)),
      "error_barrier": float(barriers.barrier_height(result.ts, result.error)),
      "loss_barrier_t": barriers.barrier_location(result.ts, result.loss),
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
  if jax.process_index() == 0:
    workdir_lib.write_json_atomic(out_path, record)
  print(f"wrote {out_path}")
  return record


def format_path_table(record: dict) -> str:
  """A plain-text table of t, loss and accuracy, with the barriers below it."""
  lines = ["     t     loss  accuracy"]
  for t, loss, acc in zip(record["ts"], record["loss"], record["accuracy"]):
    lines.append(f"{t:6.3f} {loss:8.4f} {acc:9.4f}")
  lines.append(f"loss barrier  {record['loss_barrier']:.4f} (at t = {record['loss_barrier_t']:.3f})")
  lines.append(f"error barrier {record['error_barrier']:.4f}")
  return "\n".join(lines)
