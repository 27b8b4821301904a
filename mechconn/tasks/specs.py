"""The tasks' config sections as typed values, resolved once where a launch begins.

Each `*_spec(section, ...)` reads one section of a config (an
`ml_collections.ConfigDict`: a preset, or a recorded run's config after
`records.upgrade`), checks every field (errors name `config.<section>.<field>`)
and returns a frozen dataclass. Below the task modules' `resolve`, nothing
reads a config: tasks take these specs. A recorded run's missing fields are
filled by `records.upgrade`, never here.

  ImageData / SequenceData  a `data` section (cued images, or embedded sequences)
  ModelSpec                 a `model` (or `endpoint_model`) section
  OptimizerSpec             an `optimizer` section
  LoopSpec                  a resumable loop's fields, with its optimizer
  PathSpec                  a `path` section: where a path is evaluated, how renormalised
"""

from collections.abc import Mapping
import collections.abc
import dataclasses
import typing
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mechconn import config_checks as checks
from mechconn import loop
from mechconn import mesh as mesh_lib
from mechconn import step as step_lib
from mechconn.data import datasets
from mechconn.data import pipeline
from mechconn.data import steps as data_steps
from mechconn.models import MODELS
from mechconn.models import get_model
from mechconn.models import layers
from mechconn.models import resnet
from mechconn.tasks import records
from mechconn.tasks import sequences as task_sequences
from mechconn.types import ApplyFn

Section = ml_collections.ConfigDict
DTYPES = ("float32", "bfloat16")  # a `model` section's compute dtypes


def section(values: Mapping[str, Any]) -> Section:
  """A recorded (JSON) config section as a ConfigDict, read like a preset's."""
  return ml_collections.ConfigDict(dict(values))


# --- Data. -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageData:
  """A cued image dataset (`data.pipeline`): what is loaded, and how much of it."""

  is_sequence: ClassVar[bool] = False
  dataset: str
  cue: str
  cue_proportion: float
  test_cue_proportion: float  # of each class's test examples the cue views treat
  simple_dataset: str  # Dominoes' simple half
  num_train: int  # -1: the whole split
  num_test: int  # per view; -1: the whole split
  seed: int
  data_dir: str
  download: bool
  pipeline: str  # where batches are drawn (`mechconn.data.steps`)

  @property
  def input_shape(self) -> tuple[int, ...]:
    """[H, W, C] of one model input (Dominoes: 64 x 32 x 3)."""
    return pipeline.input_shape(self.dataset, self.cue)

  @property
  def num_train_examples(self) -> int:
    full = datasets.info(self.dataset).train_size
    return full if self.num_train == -1 else min(self.num_train, full)

  @property
  def num_test_examples(self) -> int:
    full = datasets.info(self.dataset).test_size
    return full if self.num_test == -1 else min(self.num_test, full)

  @property
  def label(self) -> str:
    return f"{self.dataset} ({self.cue}, p={self.cue_proportion})"


@dataclasses.dataclass(frozen=True)
class SequenceData:
  """Embedded token sequences (`tasks.sequences.DATASETS`) for a causal language model."""

  is_sequence: ClassVar[bool] = True
  dataset: str
  num_train: int
  num_test: int  # held-out sequences: the eval set 'test'
  seed: int
  pipeline: str  # always the host pipeline ('auto' or 'host')

  @property
  def input_shape(self) -> tuple[int]:
    return (task_sequences.DATASETS[self.dataset].seq_len,)

  @property
  def num_train_examples(self) -> int:
    return self.num_train

  @property
  def num_test_examples(self) -> int:
    return self.num_test

  @property
  def label(self) -> str:
    return self.dataset


DataSpec = ImageData | SequenceData
SEQUENCE_TASKS = ("train", "eval_path")  # the tasks with a language-model case


def data_spec(data: Section, task: str, prefix: str = "data") -> DataSpec:
  """A checked `data` section. Sequence datasets only where `task` has a language-model case."""
  checks.check_choice(data.dataset, {**datasets.DATASETS, **task_sequences.DATASETS},
                      f"{prefix}.dataset")
  if task_sequences.is_sequence_data(data.dataset):
    if task not in SEQUENCE_TASKS:
      raise ValueError(f"config.{prefix}.dataset={data.dataset!r} is a sequence dataset; the "
                       f"{task} task takes image datasets only: {sorted(datasets.DATASETS)}.")
    return _sequence_data(data, prefix)
  checks.check_choice(data.cue, pipeline.CUE_KINDS, f"{prefix}.cue")
  if data.cue == "dominoes":
    checks.check_choice(data.simple_dataset, datasets.DATASETS, f"{prefix}.simple_dataset")
  for key in ("cue_proportion", "test_cue_proportion"):
    checks.check_number(data[key], f"{prefix}.{key}", low=0.0, high=1.0)
  facts = datasets.info(data.dataset)
  for key, available in (("num_train", facts.train_size), ("num_test", facts.test_size)):
    value = data[key]
    if value != -1:
      checks.check_positive_int(value, f"{prefix}.{key}", " (or -1: the whole split)")
      if value > available:
        raise ValueError(f"config.{prefix}.{key}={value} exceeds the {available} examples of "
                         f"{data.dataset}'s split (-1: all of them).")
  checks.check_int(data.seed, f"{prefix}.seed")
  checks.check_choice(data.pipeline, data_steps.PIPELINES, f"{prefix}.pipeline")
  return ImageData(dataset=data.dataset, cue=data.cue, cue_proportion=data.cue_proportion,
                   test_cue_proportion=data.test_cue_proportion,
                   simple_dataset=data.simple_dataset, num_train=data.num_train,
                   num_test=data.num_test, seed=data.seed, data_dir=data.data_dir,
                   download=data.download, pipeline=data.pipeline)


def _sequence_data(data: Section, prefix: str) -> SequenceData:
  checks.check_positive_int(data.num_train, f"{prefix}.num_train")
  checks.check_positive_int(data.num_test, f"{prefix}.num_test")
  checks.check_int(data.seed, f"{prefix}.seed")
  checks.check_choice(data.pipeline, task_sequences.PIPELINES, f"{prefix}.pipeline")
  return SequenceData(dataset=data.dataset, num_train=data.num_train, num_test=data.num_test,
                      seed=data.seed, pipeline=data.pipeline)


# --- Model. ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A network by name, its attributes and compute dtype, sized for its data."""

  name: str
  kwargs: Mapping[str, Any]
  dtype: str  # float32, or bfloat16 compute (float32 parameters, statistics and losses)
  num_classes: int  # image models
  sequence_dataset: str | None = None  # language models: the vocabulary and length

  @property
  def is_sequence(self) -> bool:
    return self.sequence_dataset is not None

  def build(self) -> nn.Module:
    """The network."""
    dtype = None if self.dtype == "float32" else jnp.dtype(self.dtype)
    if self.is_sequence:
      return task_sequences.model_of(self.name, dict(self.kwargs), self.sequence_dataset, dtype)
    return get_model(self.name, self.num_classes, dtype=dtype, **self.kwargs)

  def apply_fn(self, model: nn.Module) -> ApplyFn:
    """How mechconn calls `model` (`apply_fn(variables, x, train=...)`): an image model's own
    apply, a language model's through `adapters.without_train`."""
    return task_sequences.apply_fn_of(model) if self.is_sequence else model.apply


MODEL_CHOICES = {"weight_init": layers.WEIGHT_INITS, "conv_impl": layers.CONV_IMPLS,
                 "stem": resnet.STEMS}


def model_spec(model: Section, key: str = "model", *, dataset: str | None = None,
               num_classes: int | None = None) -> ModelSpec:
  """A checked `model` section: a known model (a language model for a sequence `dataset`),
  attributes it has, each typed as declared; classes from `dataset` or `num_classes`."""
  sequence = dataset is not None and task_sequences.is_sequence_data(dataset)
  models = task_sequences.MODELS if sequence else MODELS
  checks.check_choice(model.name, models, f"{key}.name")
  checks.check_choice(model.dtype, DTYPES, f"{key}.dtype")
  fields = {f.name for f in dataclasses.fields(models[model.name])} - {
      "parent", "name", "num_classes", "dtype",  # dtype: the section's own field
      *task_sequences.DATA_FIELDS}  # the vocabulary and length: the dataset's
  kwargs = dict(model.kwargs)
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"config.{key}.kwargs has {unknown}, not attributes of "
                     f"{model.name}; valid: {sorted(fields)}.")
  hints = typing.get_type_hints(models[model.name])
  for name, value in kwargs.items():
    _check_attribute(value, hints.get(name), name, f"{key}.kwargs.{name}")
  if num_classes is None:
    num_classes = 0 if sequence or dataset is None else datasets.info(dataset).num_classes
  return ModelSpec(name=model.name, kwargs=kwargs, dtype=model.dtype, num_classes=num_classes,
                   sequence_dataset=dataset if sequence else None)


def _check_attribute(value: Any, hint: Any, name: str, field: str) -> None:
  """Sizes positive, integers where declared so; named choices among their set."""
  if hint is int:
    checks.check_positive_int(value, field)
  elif hint is float:
    checks.check_number(value, field, low=0.0, low_open=True)
  elif typing.get_origin(hint) is collections.abc.Sequence:  # e.g. MLP hidden
    if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Sequence):
      raise ValueError(f"config.{field}={value!r} must be a sequence of positive integers.")
    for i, size in enumerate(value):
      checks.check_positive_int(size, f"{field}[{i}]")
  elif name in MODEL_CHOICES:
    checks.check_choice(value, MODEL_CHOICES[name], field)


# --- Optimisation and the loop. --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """SGD with momentum (or AdamW) and a learning-rate schedule (`tasks.optim.make`)."""

  name: str
  learning_rate: float
  momentum: float  # adamw's b1
  weight_decay: float
  schedule: str
  decay_every_epochs: int  # 'step'
  decay_factor: float  # 'step'
  warmup_steps: int  # 'warmup_cosine'


def optimizer_spec(opt: Section, prefix: str = "optimizer") -> OptimizerSpec:
  """A checked `optimizer` section: name, schedule, and every number's range."""
  checks.check_choice(opt.name, step_lib.OPTIMIZERS, f"{prefix}.name")
  checks.check_choice(opt.schedule, step_lib.SCHEDULES, f"{prefix}.schedule")
  checks.check_int(opt.warmup_steps, f"{prefix}.warmup_steps")
  checks.check_number(opt.learning_rate, f"{prefix}.learning_rate", low=0.0, low_open=True)
  checks.check_number(opt.momentum, f"{prefix}.momentum", low=0.0, high=1.0, high_open=True)
  checks.check_number(opt.weight_decay, f"{prefix}.weight_decay", low=0.0)
  checks.check_number(opt.decay_factor, f"{prefix}.decay_factor", low=0.0, high=1.0,
                      low_open=True)
  if opt.schedule == "step":
    checks.check_positive_int(opt.decay_every_epochs, f"{prefix}.decay_every_epochs")
  else:
    checks.check_int(opt.decay_every_epochs, f"{prefix}.decay_every_epochs")
  return OptimizerSpec(name=opt.name, learning_rate=opt.learning_rate, momentum=opt.momentum,
                       weight_decay=opt.weight_decay, schedule=opt.schedule,
                       decay_every_epochs=opt.decay_every_epochs,
                       decay_factor=opt.decay_factor, warmup_steps=opt.warmup_steps)


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """A resumable loop: its optimizer, length, global batch and periods."""

  optimizer: OptimizerSpec
  num_epochs: int
  batch_size: int  # global: per_device_batch_size x devices when that is set
  log_every_steps: int
  checkpoint_every_steps: int
  max_to_keep: int
  progress: bool

  def steps(self, num_examples: int, prefix: str = "") -> tuple[int, int]:
    """(steps per epoch, total steps) over `num_examples` (`steps_of`)."""
    return steps_of(self.batch_size, self.num_epochs, num_examples, prefix)

  def options(self, num_steps: int, steps_per_epoch: int, desc: str,
              eval_every: int = 0) -> loop.LoopOptions:
    """The `loop.LoopOptions` of this loop."""
    return loop.LoopOptions(num_steps=num_steps, log_every=self.log_every_steps,
                            checkpoint_every=self.checkpoint_every_steps,
                            max_to_keep=self.max_to_keep, eval_every=eval_every,
                            steps_per_epoch=steps_per_epoch, progress=self.progress, desc=desc,
                            vocabulary=records.VOCABULARY)


def steps_of(batch_size: int, num_epochs: int, num_examples: int, prefix: str = ""
             ) -> tuple[int, int]:
  """(steps per epoch, total steps); raises when the examples make no full batch (`prefix`
  names the config section, e.g. 'finetune.')."""
  steps_per_epoch = num_examples // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.{prefix}batch_size={batch_size} exceeds the {num_examples} "
                     "training examples: it makes no full batch.")
  return steps_per_epoch, num_epochs * steps_per_epoch


def loop_spec(config: Section, num_devices: int, num_examples: int, prefix: str = ""
              ) -> LoopSpec:
  """A section's checked loop fields; the global batch must divide over the devices and make
  a batch of `num_examples`, and a warm-up end before the run's last step."""
  checks.check_int(config.per_device_batch_size, f"{prefix}per_device_batch_size",
                   hint=" (0: use batch_size)")
  optimizer = optimizer_spec(config.optimizer, f"{prefix}optimizer")
  for key in ("batch_size", "num_epochs", "log_every_steps", "checkpoint_every_steps",
              "max_to_keep"):
    checks.check_positive_int(config[key], f"{prefix}{key}")
  per_device = config.per_device_batch_size
  batch_size = per_device * num_devices if per_device else config.batch_size
  mesh_lib.check_batch_size(batch_size, num_devices, f"config.{prefix}batch_size")
  spec = LoopSpec(optimizer=optimizer, num_epochs=config.num_epochs, batch_size=batch_size,
                  log_every_steps=config.log_every_steps,
                  checkpoint_every_steps=config.checkpoint_every_steps,
                  max_to_keep=config.max_to_keep, progress=config.progress)
  _, num_steps = spec.steps(num_examples, prefix)
  if optimizer.schedule == "warmup_cosine" and optimizer.warmup_steps >= num_steps:
    raise ValueError(f"config.{prefix}optimizer.warmup_steps={optimizer.warmup_steps} must be "
                     f"fewer than the run's {num_steps} steps.")
  return spec


def eval_batch_size(value: Any, num_devices: int, key: str = "eval_batch_size") -> int:
  """A checked global evaluation batch: positive and divisible over the devices."""
  checks.check_positive_int(value, key)
  mesh_lib.check_batch_size(value, num_devices, f"config.{key}")
  return value


# --- Paths. ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PathSpec:
  """Where a path is evaluated and how each point is renormalised."""

  num_t: int  # points np.linspace(0, 1, num_t)
  bn_examples: int  # examples of the statistics at each t (BatchNorm or REPAIR); 0: none
  renormalize: str | None  # evaluate_path's `renormalize`


BN_VARIANCES = {"biased": "auto", "unbiased": "batchnorm_unbiased"}


def path_spec(path: Section, *, sequence: bool = False, statistics: bool = True) -> PathSpec:
  """A checked `path` section: num_t, and (`statistics`) bn_examples and its renormalisation:
  `bn_variance` for BatchNorm, or a language model's `renormalize` (none or repair)."""
  checks.check_int(path.num_t, "path.num_t", minimum=2)
  if not statistics:
    return PathSpec(num_t=path.num_t, bn_examples=0, renormalize=None)
  checks.check_positive_int(path.bn_examples, "path.bn_examples")
  if sequence:
    checks.check_choice(path.renormalize, task_sequences.RENORMALIZE, "path.renormalize")
    renormalize = task_sequences.RENORMALIZE[path.renormalize]
  else:
    checks.check_choice(path.bn_variance, tuple(BN_VARIANCES), "path.bn_variance")
    renormalize = BN_VARIANCES[path.bn_variance]
  return PathSpec(num_t=path.num_t, bn_examples=path.bn_examples, renormalize=renormalize)
