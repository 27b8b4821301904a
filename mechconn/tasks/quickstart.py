"""The `quickstart` task: two small models from different seeds, and the linear path between.

Trains on the embedded prototype-image task (`data.prototypes`, seconds on a
CPU), in memory (`loop.fit`: no checkpoints; a relaunch retrains, with the
same numbers), evaluates the linear path at `path.num_t` points with BatchNorm
statistics recomputed at each, and writes `linear_barrier.json`.
"""

import dataclasses
import os
import time

import jax
import ml_collections
import numpy as np

from mechconn import barriers
from mechconn import config_checks as checks
from mechconn import loop
from mechconn import workdir as workdir_lib
from mechconn.data import batching
from mechconn.data import prototypes
from mechconn.tasks import data as task_data
from mechconn.tasks import model_checks
from mechconn.tasks import optim
from mechconn.tasks import runner
from mechconn.tasks import runs
from mechconn.tasks import specs

NAME = "quickstart"
RESULT_FILE = "linear_barrier.json"
LAYOUT = workdir_lib.Layout(files=(RESULT_FILE,))


@dataclasses.dataclass(frozen=True)
class PrototypeData:
  """The embedded prototype-image task (`data.prototypes`)."""

  num_classes: int
  image_size: int
  noise: float
  num_train: int
  num_test: int
  train_seed: int
  test_seed: int

  def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of the 'train' or 'test' split."""
    return prototypes.make_prototype_images(
        self.train_seed if split == "train" else self.test_seed,
        self.num_train if split == "train" else self.num_test, num_classes=self.num_classes,
        image_size=self.image_size, noise=self.noise)


@dataclasses.dataclass(frozen=True)
class QuickstartSpec:
  """A quickstart config, resolved."""

  seed: int  # model i is trained with seed + i
  data: PrototypeData
  model: specs.ModelSpec
  optimizer: specs.OptimizerSpec
  batch_size: int
  num_epochs: int
  eval_batch_size: int
  path: specs.PathSpec


def resolve(config: ml_collections.ConfigDict, num_devices: int) -> QuickstartSpec:
  """A quickstart config, checked before any work, naming the field (`loop.fit` trains on
  one device, whatever `num_devices`)."""
  del num_devices  # the protocol's argument: `loop.fit` trains on one device
  checks.check_int(config.seed, "seed")
  data = config.data
  checks.check_int(data.num_classes, "data.num_classes", minimum=2)
  checks.check_int(data.image_size, "data.image_size", minimum=4)
  checks.check_number(data.noise, "data.noise", low=0.0)
  for key in ("num_train", "num_test"):
    checks.check_positive_int(data[key], f"data.{key}")
  for key in ("train_seed", "test_seed"):
    checks.check_int(data[key], f"data.{key}")
  for key in ("batch_size", "num_epochs", "eval_batch_size"):
    checks.check_positive_int(config[key], key)
  spec = QuickstartSpec(
      seed=config.seed, data=PrototypeData(**data.to_dict()),
      model=specs.model_spec(config.model, num_classes=data.num_classes),
      optimizer=specs.optimizer_spec(config.optimizer), batch_size=config.batch_size,
      num_epochs=config.num_epochs, eval_batch_size=config.eval_batch_size,
      path=specs.path_spec(config.path))
  model_checks.check_bn_variance(spec.path, spec.model.build(),
                                 (data.image_size, data.image_size, 3))
  _steps(spec)
  if spec.path.bn_examples < spec.eval_batch_size:
    raise ValueError(f"config.path.bn_examples={spec.path.bn_examples} makes no full batch "
                     f"of eval_batch_size={spec.eval_batch_size}.")
  if spec.path.bn_examples > data.num_train:
    raise ValueError(f"config.path.bn_examples={spec.path.bn_examples} exceeds "
                     f"config.data.num_train={data.num_train}.")
  return spec


def _steps(spec: QuickstartSpec) -> tuple[int, int]:
  """(steps per epoch, total steps) of each model's training."""
  return specs.steps_of(spec.batch_size, spec.num_epochs, spec.data.num_train)


def run(spec: QuickstartSpec, job: runner.Job) -> dict:
  """Trains the two models and evaluates the path; returns the linear_barrier.json record."""
  steps_per_epoch, num_steps = _steps(spec)
  tx, _ = optim.make_optimizer(spec.optimizer, num_steps=num_steps,
                               steps_per_epoch=steps_per_epoch)
  model = spec.model.build()
  train_x, train_y = spec.data.split("train")
  test_x, test_y = spec.data.split("test")

  start = time.perf_counter()
  states = []
  for i in range(2):
    state, history = loop.fit(model, tx, train_x, train_y, batch_size=spec.batch_size,
                              num_epochs=spec.num_epochs, seed=spec.seed + i,
                              desc=f"model {i}")
    print(f"model {i}: final epoch train loss {history[-1]['loss']:.4f}, "
          f"train accuracy {history[-1]['accuracy']:.4f}")
    states.append(state)
  train_seconds = time.perf_counter() - start

  eval_batches = batching.stack_batches(test_x, test_y, spec.eval_batch_size)
  n = spec.path.bn_examples
  bn_batches = task_data.bn_batches_of({"image": train_x[:n], "label": train_y[:n]},
                                       spec.eval_batch_size)
  has_bn = bool(states[0].batch_stats)
  ts = np.linspace(0.0, 1.0, spec.path.num_t)
  start = time.perf_counter()
  result = jax.device_get(barriers.evaluate_path(
      model.apply, (states[0].params, states[1].params), ts, eval_batches,
      bn_batches=bn_batches if has_bn else None, renormalize=spec.path.renormalize))
  eval_seconds = time.perf_counter() - start

  record = {
      "path": "linear",
      "ts": np.asarray(result.ts).tolist(),
      **runs.path_curves(result),
      "summary": result.summary(),
      "batchnorm_recomputed_from": (
          f"{bn_batches['image'].shape[0] * bn_batches['image'].shape[1]} training examples"
          if has_bn else None),
      "eval_examples": int(len(test_x)),
      "seeds": [spec.seed, spec.seed + 1],
      "train_seconds": round(train_seconds, 2),
      "path_eval_seconds": round(eval_seconds, 2),
      "backend": jax.default_backend(),
      "config": job.config_dict,
  }
  print(format_path_table(record))
  runner.write_outputs(job.workdir, {RESULT_FILE: record})
  print(f"wrote {os.path.join(job.workdir, RESULT_FILE)}")
  return record


def format_path_table(record: dict) -> str:
  """A plain-text table of t, loss and accuracy, with the barriers below it."""
  lines = ["     t     loss  accuracy"]
  for t, loss, acc in zip(record["ts"], record["loss"], record["accuracy"]):
    lines.append(f"{t:6.3f} {loss:8.4f} {acc:9.4f}")
  summary = record["summary"]
  lines.append(f"loss barrier  {summary['loss']:.4f} (at t = {summary['loss_t']:.3f})")
  lines.append(f"error barrier {summary['error']:.4f}")
  return "\n".join(lines)
