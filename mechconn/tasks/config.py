"""What the tasks read from their configs: checks that name the field, and values derived.

Validators only check (they never write into the config); values that follow
from a config and the job (the global batch size for `per_device_batch_size`,
steps, the optimiser) are functions that return them. Sections are read by
attribute, so any container works (an `ml_collections.ConfigDict`, a recorded
config as an `AttrDict`).
"""

import collections.abc
import dataclasses
import typing
from typing import Any

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import optax

from mechconn import batchnorm
from mechconn import config_checks as checks
from mechconn import loop
from mechconn import mesh as mesh_lib
from mechconn import step as step_lib
from mechconn.data import datasets
from mechconn.data import pipeline
from mechconn.models import MODELS
from mechconn.models import layers
from mechconn.models import resnet
from mechconn.tasks import data as task_data
from mechconn.tasks import runs
from mechconn.tasks import sequences as task_sequences


class AttrDict(dict):
  """A dict read by attribute (a run's recorded config section)."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError as e:
      raise AttributeError(name) from e


# --- Data. -----------------------------------------------------------------------


def check_data_config(data: Any, task: str | None = None) -> None:
  """Validates a `data` section: names, the cue proportion, sizes within the split.

  A sequence dataset (`tasks.sequences.DATASETS`) is valid only where `task`
  is 'train' or 'eval_path' (the tasks with a language-model case); for any
  other `task` (or None) it is refused with an error naming the task.
  """
  checks.check_choice(data.dataset, {**datasets.DATASETS, **task_sequences.DATASETS},
                      "data.dataset")
  if task_sequences.is_sequence_data(data.dataset):
    if task not in ("train", "eval_path"):
      raise ValueError(f"config.data.dataset={data.dataset!r} is a sequence dataset; "
                       f"{f'the {task} task' if task else 'this task'} takes image datasets "
                       f"only: {sorted(datasets.DATASETS)}.")
    task_sequences.check_data_config(data)
    return
  checks.check_choice(data.cue, pipeline.CUE_KINDS, "data.cue")
  if data.cue == "dominoes":
    checks.check_choice(data.simple_dataset, datasets.DATASETS, "data.simple_dataset")
  checks.check_number(data.cue_proportion, "data.cue_proportion", low=0.0, high=1.0)
  checks.check_number(task_data.test_cue_proportion(data), "data.test_cue_proportion",
                      low=0.0, high=1.0)
  facts = datasets.info(data.dataset)
  for key, available in (("num_train", facts.train_size), ("num_test", facts.test_size)):
    value = data[key]
    if value != -1:
      checks.check_positive_int(value, f"data.{key}", " (or -1: the whole split)")
      if value > available:
        raise ValueError(f"config.data.{key}={value} exceeds the {available} examples of "
                         f"{data.dataset}'s split (-1: all of them).")
  checks.check_int(data.seed, "data.seed")
  checks.check_choice(data.get("pipeline", "auto"), task_data.PIPELINES, "data.pipeline")


def num_train_examples(data: Any) -> int:
  """Training examples of a `data` section, without loading it."""
  if task_sequences.is_sequence_data(data.dataset):
    return data.num_train
  full = datasets.info(data.dataset).train_size
  return full if data.num_train == -1 else min(data.num_train, full)


def num_test_examples(data: Any) -> int:
  """Test examples per view (held-out sequences) of a `data` section, without loading it."""
  if task_sequences.is_sequence_data(data.dataset):
    return data.num_test
  full = datasets.info(data.dataset).test_size
  return full if data.num_test == -1 else min(data.num_test, full)


def input_shape(data: Any) -> tuple[int, ...]:
  """[H, W, C] of the model inputs of a `data` section (Dominoes: 64 x 32 x 3); [L] of
  sequences."""
  if task_sequences.is_sequence_data(data.dataset):
    return task_sequences.input_shape(data)
  return pipeline.input_shape(data.dataset, data.cue)


# --- Model. ----------------------------------------------------------------------


BN_VARIANCES = ("biased", "unbiased")


def renormalize_of(path: Any) -> str:
  """evaluate_path's `renormalize` for a `path` section's `bn_variance` (checked; recorded
  runs without it: biased). `check_bn_variance` refuses 'unbiased' for a BatchNorm-free model."""
  variance = path.get("bn_variance", "biased")
  checks.check_choice(variance, BN_VARIANCES, "path.bn_variance")
  return "batchnorm_unbiased" if variance == "unbiased" else "auto"


def check_bn_variance(path: Any, model: Any, image_shape: tuple[int, ...]) -> None:
  """Refuses path.bn_variance='unbiased' for a model without BatchNorm, before any work
  (shapes only: the model is traced abstractly)."""
  if renormalize_of(path) == "auto":
    return
  x = jnp.zeros((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  if not batchnorm.has_batchnorm(model.apply, variables, x):
    raise ValueError(f"config.path.bn_variance='unbiased' but {type(model).__name__} has no "
                     "BatchNorm layer (nothing to recompute); use 'biased'.")


def _calls_relu(jaxpr) -> bool:
  """Whether a traced program calls `jax.nn.relu` (flax's `nn.relu`). A bare max(x, 0)
  is not counted: LayerNorm clamps its variance that way."""
  for eqn in jaxpr.eqns:
    if eqn.params.get("name") == "relu":
      return True
    values = [x for v in eqn.params.values() for x in (v if isinstance(v, tuple) else (v,))]
    if any(_calls_relu(getattr(v, "jaxpr", v)) for v in values
           if isinstance(v, (jax_core.Jaxpr, jax_core.ClosedJaxpr))):
      return True
  return False


def check_activation_sites(sites: str, model: Any, image_shape: tuple[int, ...]) -> None:
  """Refuses activation_sites='post_relu' for a network that applies no ReLU (a GELU
  ViT, say): matching would correlate ReLUs the network never computes (shapes only)."""
  if sites != "post_relu":
    return
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  program = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  if not _calls_relu(program.jaxpr):
    raise ValueError(f"config.activation_sites='post_relu' applies a ReLU to every site, but "
                     f"{type(model).__name__} calls no jax.nn.relu (its nonlinearity is another, "
                     "e.g. GELU); use activation_sites='module_outputs'.")


MODEL_CHOICES = {"weight_init": layers.WEIGHT_INITS, "conv_impl": layers.CONV_IMPLS,
                 "stem": resnet.STEMS}


def check_model_config(model: Any, key: str = "model", dataset: str | None = None) -> None:
  """Validates a `model` section: a known model and attributes it has, typed as declared.

  The models of a sequence `dataset` are language models (`tasks.sequences.MODELS`);
  any other dataset's (or None's) are the image models.
  """
  sequence = dataset is not None and task_sequences.is_sequence_data(dataset)
  models = task_sequences.MODELS if sequence else MODELS
  checks.check_choice(model.name, models, f"{key}.name")
  checks.check_choice(model.get("dtype", "float32"), runs.DTYPES, f"{key}.dtype")
  fields = {f.name for f in dataclasses.fields(models[model.name])} - {
      "parent", "name", "num_classes", "dtype",  # dtype: the section's own field
      *task_sequences.DATA_FIELDS}  # the vocabulary and length: the dataset's
  unknown = sorted(set(model.kwargs) - fields)
  if unknown:
    raise ValueError(f"config.{key}.kwargs has {unknown}, not attributes of "
                     f"{model.name}; valid: {sorted(fields)}.")
  hints = typing.get_type_hints(models[model.name])
  for name, value in model.kwargs.items():  # sizes: positive, integers where declared so
    field = f"{key}.kwargs.{name}"
    if hints.get(name) is int:
      checks.check_positive_int(value, field)
    elif hints.get(name) is float:
      checks.check_number(value, field, low=0.0, low_open=True)
    elif typing.get_origin(hints.get(name)) is collections.abc.Sequence:  # e.g. MLP hidden
      if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Sequence):
        raise ValueError(f"config.{field}={value!r} must be a sequence of positive integers.")
      for i, size in enumerate(value):
        checks.check_positive_int(size, f"{field}[{i}]")
    elif name in MODEL_CHOICES:  # e.g. weight_init: one of a named set
      checks.check_choice(value, MODEL_CHOICES[name], field)


# --- Optimisation and the loop. --------------------------------------------------


def check_optimizer_config(opt: Any, prefix: str = "optimizer") -> None:
  """Validates an `optimizer` section: name, schedule, and every number's range."""
  checks.check_choice(opt.name, step_lib.OPTIMIZERS, f"{prefix}.name")
  checks.check_choice(opt.schedule, step_lib.SCHEDULES, f"{prefix}.schedule")
  checks.check_int(warmup_steps_of(opt), f"{prefix}.warmup_steps")
  checks.check_number(opt.learning_rate, f"{prefix}.learning_rate", low=0.0, low_open=True)
  checks.check_number(opt.momentum, f"{prefix}.momentum", low=0.0, high=1.0, high_open=True)
  checks.check_number(opt.weight_decay, f"{prefix}.weight_decay", low=0.0)
  checks.check_number(opt.decay_factor, f"{prefix}.decay_factor", low=0.0, high=1.0,
                      low_open=True)
  if opt.schedule == "step":
    checks.check_positive_int(opt.decay_every_epochs, f"{prefix}.decay_every_epochs")
  else:
    checks.check_int(opt.decay_every_epochs, f"{prefix}.decay_every_epochs")


def warmup_steps_of(opt: Any) -> int:
  """An `optimizer` section's warm-up steps ('warmup_cosine'); sections without the field
  (every recipe but the language model's): 0."""
  return opt.get("warmup_steps", 0)


def check_warmup(opt: Any, num_steps: int, prefix: str = "optimizer") -> None:
  """Refuses a 'warmup_cosine' warm-up that does not end before the run's last step."""
  if opt.schedule == "warmup_cosine" and warmup_steps_of(opt) >= num_steps:
    raise ValueError(f"config.{prefix}.warmup_steps={warmup_steps_of(opt)} must be fewer than "
                     f"the run's {num_steps} steps.")


def batch_size_of(config: Any, num_devices: int) -> int:
  """The global training batch: `per_device_batch_size` x devices when that is positive,
  else `batch_size` (one config follows the device count of the job it runs in; the
  learning rate is not rescaled)."""
  per_device = config.get("per_device_batch_size", 0)
  return per_device * num_devices if per_device else config.batch_size


def check_loop_config(config: Any, num_devices: int, prefix: str = "") -> None:
  """Validates a resumable loop's fields: optimizer, epochs, batch size, periods.

  `eval_every_steps` and `eval_batch_size` are checked where the section has
  them (tasks that evaluate during the loop). Batch sizes must divide over the
  devices.
  """
  checks.check_int(config.get("per_device_batch_size", 0), f"{prefix}per_device_batch_size",
                   hint=" (0: use batch_size)")
  check_optimizer_config(config.optimizer, f"{prefix}optimizer")
  for key in ("batch_size", "num_epochs", "log_every_steps", "checkpoint_every_steps",
              "max_to_keep"):
    checks.check_positive_int(config[key], f"{prefix}{key}")
  if "eval_every_steps" in config:
    checks.check_int(config.eval_every_steps, f"{prefix}eval_every_steps",
                     hint=" (0: evaluate only at the end)")
  batch_size = batch_size_of(config, num_devices)
  mesh_lib.check_batch_size(batch_size, num_devices, f"config.{prefix}batch_size")
  if "eval_batch_size" in config:
    check_eval_batch_size(config, num_devices, prefix)


def check_eval_batch_size(config: Any, num_devices: int, prefix: str = "") -> None:
  checks.check_positive_int(config.eval_batch_size, f"{prefix}eval_batch_size")
  mesh_lib.check_batch_size(config.eval_batch_size, num_devices,
                            f"config.{prefix}eval_batch_size")


def steps_of(batch_size: int, num_epochs: int, num_examples: int, prefix: str = ""
             ) -> tuple[int, int]:
  """(steps per epoch, total steps); raises when the examples make no full batch.

  `prefix` names the config section in the error (e.g. 'finetune.').
  """
  steps_per_epoch = num_examples // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.{prefix}batch_size={batch_size} exceeds the "
                     f"{num_examples} training examples: it makes no full batch.")
  return steps_per_epoch, num_epochs * steps_per_epoch


def make_optimizer(opt: Any, *, num_steps: int, steps_per_epoch: int,
                   learning_rate: float | None = None, updates_per_step: int = 1,
                   hold_steps: int = 0) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimiser, learning-rate schedule over the loop's steps) of an `optimizer` section.

  `learning_rate` replaces the section's peak learning rate when given. A step
  that makes `updates_per_step` optimiser updates (CBFT: a barrier and a clean
  update) runs all of them at the step's rate: optax advances a schedule once
  per update, so the optimiser's schedule reads its count // updates_per_step.
  The first `hold_steps` steps run at the schedule's start, from which it then
  runs (the official CBFT scheduler, stepped only after its warm-up).
  """
  schedule = step_lib.learning_rate_schedule(
      opt.schedule, opt.learning_rate if learning_rate is None else learning_rate,
      total_steps=num_steps, steps_per_epoch=steps_per_epoch,
      decay_every_epochs=opt.decay_every_epochs, decay_factor=opt.decay_factor,
      warmup_steps=warmup_steps_of(opt))
  per_step = schedule if not hold_steps else (
      lambda step: schedule(jnp.maximum(step - hold_steps, 0)))
  per_update = per_step if updates_per_step == 1 else (
      lambda count: per_step(count // updates_per_step))
  if opt.name == "adamw":  # momentum is Adam's b1
    return step_lib.adamw(per_update, b1=opt.momentum, weight_decay=opt.weight_decay), per_step
  return step_lib.sgd(per_update, momentum=opt.momentum,
                      weight_decay=opt.weight_decay), per_step


SCHEDULE_PER = ("iteration", "iteration_after_warmup", "update")


def cbft_schedule(cbft: Any, steps_per_epoch: int) -> tuple[int, int]:
  """(optimiser updates per CBFT iteration that share its learning rate, iterations held at
  the peak rate) from `finetune.cbft.schedule_per` (checked): 'iteration' (both updates at
  the iteration's rate, as the official scheduler); 'iteration_after_warmup' (as the official
  script, whose scheduler steps only from epoch warmup_epochs + 1: the peak rate until then,
  the cosine from its start after, ending short of 0); 'update' (the schedule advancing per
  update, so reaching its end halfway: what runs recorded before the field did)."""
  schedule_per = cbft.get("schedule_per", "update")
  checks.check_choice(schedule_per, SCHEDULE_PER, "finetune.cbft.schedule_per")
  shared = 2 if schedule_per != "update" and cbft.get("barrier_loss", True) else 1
  # From iteration D = (warmup_epochs + 1) epochs, the official step after iteration i sets
  # the rate of iteration i + 1 to schedule[i - D]: iteration j runs at schedule[j - D - 1].
  held = ((cbft.warmup_epochs + 1) * steps_per_epoch + 1
          if schedule_per == "iteration_after_warmup" else 0)
  return shared, held


def loop_options(config: Any, num_steps: int, steps_per_epoch: int, desc: str
                 ) -> loop.LoopOptions:
  """The `loop.LoopOptions` of a section with the loop fields."""
  return loop.LoopOptions(num_steps=num_steps, log_every=config.log_every_steps,
                          checkpoint_every=config.checkpoint_every_steps,
                          max_to_keep=config.max_to_keep,
                          eval_every=config.get("eval_every_steps", 0),
                          steps_per_epoch=steps_per_epoch, progress=config.progress, desc=desc)
