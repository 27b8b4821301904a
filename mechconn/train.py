"""Training: one pure jitted step, a resumable loop, and the `train` driver.

- `train_step(state, batch, root_key, *, loss_fn, tx) -> (state, metrics)`: one
  jitted, state-donating step; its randomness is `fold_in(root_key, step)`.
- `train_loop`: runs any such step for a number of steps on a data mesh with
  orbax checkpoints, JSON-lines metrics, a tqdm bar and auto-resume. Batches
  and step keys are functions of the step number, so a run killed at any step
  and resumed ends with the parameters of an uninterrupted run (bitwise, on
  the same machine). A step whose loss, gradient norm or parameter norm is not
  finite stops the run (`finite.NonFiniteError`, naming the step and the last
  good checkpoint); the whole state is checked before every save.
- `train_and_evaluate(config, workdir)`: the `train` task. Builds the cued data,
  the model and the optimiser from a config, trains, evaluates on the four
  counterfactual views every `eval_every_steps` and at the end.
- `fit`: a small in-memory loop without checkpoints, for quick experiments.
"""

import collections.abc
from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import functools
import json
import os
import time
import typing
from typing import Any, Protocol

import chex
import flax
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from mechconn import batchnorm
from mechconn import checkpoint
from mechconn import config_checks as checks
from mechconn import counterfactual
from mechconn import dry_run as dry_run_lib
from mechconn import finite
from mechconn import mesh as mesh_lib
from mechconn import workdir as workdir_lib
from mechconn.data import datasets
from mechconn.data import pipeline
from mechconn.models import MODELS, get_model

Params = chex.ArrayTree
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
PRNGKey = jax.Array

SCHEDULES = ("constant", "cosine", "step")
OPTIMIZERS = ("sgd",)
CHECKPOINT_DIR = "checkpoints"
FINAL_EVAL_FILE = "final_eval.json"
# What a resumable loop writes into its workdir (its task adds its result files).
LOOP_LAYOUT = workdir_lib.Layout(files=(workdir_lib.METRICS_FILE,),
                                 checkpoint_dirs=(CHECKPOINT_DIR,))
LAYOUT = dataclasses.replace(LOOP_LAYOUT, files=LOOP_LAYOUT.files + (FINAL_EVAL_FILE,))


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step."""

  step: jax.Array
  params: Params
  batch_stats: Params
  opt_state: optax.OptState

  @property
  def variables(self) -> dict[str, Params]:
    """The Flax variables for `model.apply` ('batch_stats' only when present)."""
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       rng: PRNGKey, sample_images: jax.Array) -> TrainState:
  """Initialises parameters from `rng` and the optimiser state."""
  variables = model.init(rng, sample_images, train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params))


class LossFn(Protocol):
  """loss_fn(params, batch_stats, batch, rng) -> (loss, (new_batch_stats, metrics)).

  Differentiated with respect to `params`; `metrics` is a dict of scalars
  averaged into the logs beside the loss. A loss is passed to the jitted step
  as a pytree, so it may carry arrays (fixed endpoints, a reference model):
  write it as a `flax.struct.dataclass` whose functions are static fields, or
  wrap a plain function with `jax.tree_util.Partial(fn, *arrays)`.
  """

  def __call__(self, params: Params, batch_stats: Params, batch: Batch, rng: PRNGKey
               ) -> tuple[jax.Array, tuple[Params, Metrics]]:
    ...


def apply_train_mode(apply_fn: batchnorm.ApplyFn, params: Params, batch_stats: Params,
                     images: jax.Array) -> tuple[jax.Array, Params]:
  """Logits in training mode and the updated batch_stats (unchanged when there are none)."""
  if not batch_stats:
    return apply_fn({"params": params}, images, train=True), batch_stats
  logits, updates = apply_fn({"params": params, "batch_stats": batch_stats}, images,
                             train=True, mutable=["batch_stats"])
  return logits, updates["batch_stats"]


@flax.struct.dataclass
class ClassificationLoss:
  """Mean softmax cross-entropy of `apply_fn` in training mode (a `LossFn`).

  A pytree with no leaves: `apply_fn` is static, so a step bound to equal
  losses compiles once.
  """

  apply_fn: batchnorm.ApplyFn = flax.struct.field(pytree_node=False)

  def __call__(self, params, batch_stats, batch, rng):
    del rng  # deterministic models; dropout-like layers would take it here
    logits, new_batch_stats = apply_train_mode(self.apply_fn, params, batch_stats,
                                               batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, (new_batch_stats, {"accuracy": accuracy})


@functools.partial(jax.jit, static_argnames="tx", donate_argnums=0)
def train_step(state: TrainState, batch: Batch, root_key: PRNGKey, *, loss_fn: LossFn,
               tx: optax.GradientTransformation) -> tuple[TrainState, Metrics]:
  """One optimiser step on `loss_fn`; returns (new state, metrics).

  The state is donated (its buffers are reused for the new state). The step's
  key is `fold_in(root_key, state.step)`, so randomness depends only on the
  root key and the step number: a resumed run draws what an uninterrupted one
  draws.
  """
  rng = jax.random.fold_in(root_key, state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (batch_stats, aux)), grads = grad_fn(state.params, state.batch_stats, batch, rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads),
             "param_norm": optax.tree.norm(params)}
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state)
  return new_state, metrics


def learning_rate_schedule(kind: str, learning_rate: float, *, total_steps: int,
                           steps_per_epoch: int = 1, decay_every_epochs: int = 0,
                           decay_factor: float = 0.1) -> optax.Schedule:
  """An optax schedule: 'constant', 'cosine' (to 0 at total_steps) or 'step'.

  'step' multiplies the rate by `decay_factor` every `decay_every_epochs`
  epochs (the paper's x0.1 every 40 epochs), as torch's StepLR per epoch.
  """
  if kind == "constant":
    return optax.constant_schedule(learning_rate)
  if kind == "cosine":
    return optax.cosine_decay_schedule(learning_rate, decay_steps=max(total_steps, 1))
  if kind == "step":
    if decay_every_epochs <= 0:
      raise ValueError(f"A 'step' schedule needs decay_every_epochs > 0, got "
                       f"{decay_every_epochs}.")
    boundaries = range(decay_every_epochs * steps_per_epoch, total_steps,
                       decay_every_epochs * steps_per_epoch)
    return optax.piecewise_constant_schedule(learning_rate,
                                             {b: decay_factor for b in boundaries})
  raise ValueError(f"Unknown schedule {kind!r}; valid schedules: {SCHEDULES}.")


def sgd(schedule: optax.ScalarOrSchedule, *, momentum: float = 0.9,
        weight_decay: float = 5e-4) -> optax.GradientTransformation:
  """SGD with momentum; weight decay added to the gradient first, as torch.optim.SGD."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(schedule, momentum=momentum))


def sgd_cosine(learning_rate: float, total_steps: int, *, momentum: float = 0.9,
               weight_decay: float = 5e-4) -> optax.GradientTransformation:
  """`sgd` with a cosine schedule from `learning_rate` to 0 over total_steps."""
  return sgd(learning_rate_schedule("cosine", learning_rate, total_steps=total_steps),
             momentum=momentum, weight_decay=weight_decay)


epoch_permutation = pipeline.epoch_permutation


def first_nonfinite_step(stacked: dict[str, np.ndarray]) -> tuple[int, dict] | None:
  """(index, that step's metrics) of the first step with a non-finite metric, or None.

  `stacked` holds each metric over steps (leading axis), e.g. loss, grad_norm
  and param_norm: the norms are one reduction each over every gradient and
  parameter leaf, so a single NaN anywhere shows in them. Ensemble metrics
  ([steps, members]) count when any member's value is not finite.
  """
  num_steps = len(next(iter(stacked.values())))
  ok = np.ones(num_steps, bool)
  for value in stacked.values():
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.inexact):
      ok &= np.isfinite(value.reshape(num_steps, -1)).all(axis=1)
  if ok.all():
    return None
  i = int(np.argmin(ok))
  return i, {k: np.asarray(v)[i].tolist() for k, v in stacked.items()}


def raise_if_diverged(stacked: dict[str, np.ndarray], first_step: int,
                      saved: Callable[[], str]) -> None:
  """Raises NonFiniteError at the first step of the window whose metrics are not finite.

  Args:
    stacked: metrics over the steps of the window.
    first_step: the 0-based step of the window's first entry.
    saved: () -> what was saved before it (e.g. the last good checkpoint), for
      the message; called only when raising.
  """
  found = first_nonfinite_step(stacked)
  if found is None:
    return
  i, values = found
  bad = {k: v for k, v in values.items() if not np.all(np.isfinite(v))}
  raise finite.NonFiniteError(
      f"Training diverged at step {first_step + i + 1} (the update from step "
      f"{first_step + i} to {first_step + i + 1}; step numbers count updates, as the "
      f"checkpoints and metrics do): non-finite {bad}. Nothing from that step on was saved; "
      f"{saved()}. Look for NaN or infinity in the data, or lower the learning rate (then "
      "relaunch into a new --workdir, or here with --overwrite).")


@dataclasses.dataclass(frozen=True)
class LoopOptions:
  """How `train_loop` runs: lengths and periods are in steps."""

  num_steps: int
  log_every: int = 50
  checkpoint_every: int = 500
  max_to_keep: int = 3
  eval_every: int = 0  # 0: only at the end
  steps_per_epoch: int = 0  # for the 'epoch' field of the logs (0: omitted)
  progress: bool = True
  desc: str = "train"


def train_loop(init_fn: Callable[[], Any], step_fn: Callable[[Any, Batch], tuple[Any, Metrics]],
               batch_fn: Callable[[int], Batch], workdir: str, options: LoopOptions, *,
               mesh: jax.sharding.Mesh, learning_rate_fn: Callable[[int], float] | None = None,
               eval_fn: Callable[[Any], dict[str, float]] | None = None,
               examples_per_step: int = 0) -> Any:
  """Runs `step_fn` to `options.num_steps`, resuming from the workdir's latest checkpoint.

  Args:
    init_fn: () -> a fresh state with an integer `.step` (e.g. a TrainState);
      run under jit, replicated over the mesh.
    step_fn: (state, batch) -> (state, metrics), e.g. `train_step` with its
      statics bound; metrics must include 'loss'.
    batch_fn: step -> the global batch of that 0-based step, sharded over the
      mesh. Must be a pure function of the step for resumption to be exact.
    workdir: checkpoints go to workdir/checkpoints, metrics to
      workdir/metrics.jsonl (one JSON object per log/eval step).
    options: lengths and periods.
    mesh: the data mesh (`mesh.data_mesh()`).
    learning_rate_fn: step -> learning rate, logged.
    eval_fn: state -> flat dict of evaluation metrics, logged every
      `options.eval_every` steps and at the end.
    examples_per_step: for the logged examples/s.

  Returns:
    The final state (also saved as the last checkpoint).
  """
  replicated = mesh_lib.replicated(mesh)
  metrics_path = os.path.join(workdir, workdir_lib.METRICS_FILE)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR),
                                 max_to_keep=options.max_to_keep)
  # Resume order:
  # 1. the latest complete checkpoint, checked leaf by leaf against an abstract
  #    state (no arrays allocated); a fresh init when there is none;
  # 2. metrics lines past the restored step are dropped (a killed run may have
  #    logged steps that it had not checkpointed);
  # 3. nothing else: batches and step keys are functions of the step number,
  #    and the optimiser's schedule counts in its restored state.
  latest = ckpt.latest_step()
  if latest is not None:
    abstract = mesh_lib.abstract_like(jax.eval_shape(init_fn), replicated)
    state = ckpt.restore(abstract, latest)
    if jax.process_index() == 0:  # said on the terminal: a resume is not a fresh start
      print(f"{options.desc}: resumed from {ckpt.step_dir(latest)} (step {latest} of "
            f"{options.num_steps})")
  else:
    state = jax.jit(init_fn, out_shardings=replicated)()
  start = int(state.step)
  if jax.process_index() == 0:
    workdir_lib.truncate_metrics(metrics_path, start)

  writer = workdir_lib.MetricsWriter(metrics_path, enabled=jax.process_index() == 0)
  bar = tqdm.tqdm(total=options.num_steps, initial=start, desc=options.desc,
                  disable=not options.progress or jax.process_index() != 0,
                  dynamic_ncols=True, leave=False)
  pending, window_start, tick = [], start, time.perf_counter()

  def saved_so_far():  # only on the error path: it waits for pending saves
    ckpt.wait()
    last_good = ckpt.latest_step()
    return (f"the last good checkpoint is {ckpt.step_dir(last_good)}" if last_good is not None
            else "no checkpoint had been written")

  def check_state(state, done, why):
    # Metrics cover params and gradients; this also covers batch_stats and the
    # optimiser state: one compiled reduction, before anything is saved or evaluated.
    if not bool(finite.all_finite_jit(state)):
      raise finite.NonFiniteError(
          f"The training state after step {done} holds NaN or infinity (first at "
          f"{finite.first_nonfinite_leaf(state)}), found before {why}; it was not saved. "
          f"{saved_so_far().capitalize()}.")

  try:
    for step in range(start, options.num_steps):
      state, metrics = step_fn(state, batch_fn(step))
      pending.append(metrics)  # stays on device until the next log, eval or checkpoint
      done = step + 1
      bar.update(1)
      last = done == options.num_steps
      log_now = done % options.log_every == 0 or last
      eval_now = eval_fn is not None and (
          (options.eval_every and done % options.eval_every == 0) or last)
      save_now = done % options.checkpoint_every == 0 or last
      if log_now or eval_now or save_now:  # read the window's metrics: finite?
        stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *pending))
        raise_if_diverged(stacked, window_start, saved_so_far)
      if log_now:
        elapsed = time.perf_counter() - tick
        record = {"step": done}
        if options.steps_per_epoch:
          record["epoch"] = round(done / options.steps_per_epoch, 4)
        record.update({f"train/{k}": float(np.mean(v)) for k, v in stacked.items()})
        if learning_rate_fn is not None:
          record["learning_rate"] = float(learning_rate_fn(step))
        if examples_per_step:
          record["examples_per_s"] = round(examples_per_step * len(pending) / elapsed, 1)
        writer.write(record)
        bar.set_postfix(loss=f"{record['train/loss']:.3f}",
                        acc=f"{record.get('train/accuracy', float('nan')):.3f}",
                        lr=f"{record.get('learning_rate', float('nan')):.3g}",
                        ex_s=f"{record.get('examples_per_s', 0):.0f}")
        pending, window_start, tick = [], done, time.perf_counter()
      if eval_now:
        check_state(state, done, "evaluating it")
        writer.write({"step": done, **eval_fn(state)})
      if save_now:
        check_state(state, done, "saving it")
        ckpt.save(done, state)
  finally:
    bar.close()
    writer.close()
    ckpt.close()
  return state


def fit(model: nn.Module, tx: optax.GradientTransformation, images: np.ndarray,
        labels: np.ndarray, *, batch_size: int, num_epochs: int, seed: int,
        progress: bool = True, desc: str = "train") -> tuple[TrainState, list[dict]]:
  """Trains `model` in memory from a fresh init; returns (state, per-epoch metrics).

  No checkpoints, one device: for small experiments and the quickstart. Partial
  last batches are dropped (one compiled shape). Images holding NaN or infinity
  are refused up front; a non-finite loss, gradient norm or parameter norm
  raises `finite.NonFiniteError` naming the step (read once per epoch).
  """
  steps_per_epoch = len(images) // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{len(images)} examples make no batch of {batch_size}.")
  bad = ~np.isfinite(images.reshape(len(images), -1)).all(axis=1)
  if bad.any():
    raise finite.NonFiniteError(f"fit: {int(bad.sum())} of the {len(images)} training images "
                                f"hold NaN or infinity (first: index {int(np.argmax(bad))}).")
  root = jax.random.key(seed)
  state = create_train_state(model, tx, jax.random.fold_in(root, 0), jnp.asarray(images[:2]))
  step_fn = functools.partial(train_step, loss_fn=ClassificationLoss(model.apply), tx=tx)
  step_key = jax.random.fold_in(root, 1)
  history = []
  bar = tqdm.trange(num_epochs, desc=desc, disable=not progress, leave=False)
  for epoch in bar:
    order = epoch_permutation(seed, epoch, len(images))
    epoch_metrics = []
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      batch = {"image": jnp.asarray(images[idx]), "label": jnp.asarray(labels[idx])}
      state, metrics = step_fn(state, batch, step_key)
      epoch_metrics.append(metrics)
    stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *epoch_metrics))
    raise_if_diverged(stacked, epoch * steps_per_epoch, lambda: "fit keeps no checkpoints")
    history.append({"epoch": epoch, **{k: float(np.mean(v)) for k, v in stacked.items()}})
    bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", acc=f"{history[-1]['accuracy']:.3f}")
  return state, history


# ---------------------------------------------------------------------------
# The `train` task.


def check_data_config(data: Any) -> None:
  """Validates a config's `data` section (see experiments/configs/train.py)."""
  checks.check_choice(data.dataset, datasets.NUM_CLASSES, "data.dataset")
  checks.check_choice(data.cue, pipeline.CUE_KINDS, "data.cue")
  if data.cue == "dominoes":
    checks.check_choice(data.simple_dataset, datasets.NUM_CLASSES, "data.simple_dataset")
  checks.check_number(data.cue_proportion, "data.cue_proportion", low=0.0, high=1.0)
  sizes = {"num_train": dry_run_lib.TRAIN_SIZES.get(data.dataset),
           "num_test": dry_run_lib.TEST_SIZE}
  for key, available in sizes.items():
    value = data[key]
    if value != -1:
      checks.check_positive_int(value, f"data.{key}", " (or -1: the whole split)")
      if available is not None and value > available:
        raise ValueError(f"config.data.{key}={value} exceeds the {available} examples of "
                         f"{data.dataset}'s split (-1: all of them).")
  checks.check_int(data.seed, "data.seed")


def check_optimizer_config(opt: Any, prefix: str = "optimizer") -> None:
  """Validates an `optimizer` section: name, schedule, and every number's range."""
  checks.check_choice(opt.name, OPTIMIZERS, f"{prefix}.name")
  checks.check_choice(opt.schedule, SCHEDULES, f"{prefix}.schedule")
  checks.check_number(opt.learning_rate, f"{prefix}.learning_rate", low=0.0, low_open=True)
  checks.check_number(opt.momentum, f"{prefix}.momentum", low=0.0, high=1.0, high_open=True)
  checks.check_number(opt.weight_decay, f"{prefix}.weight_decay", low=0.0)
  checks.check_number(opt.decay_factor, f"{prefix}.decay_factor", low=0.0, high=1.0,
                      low_open=True)
  if opt.schedule == "step":
    checks.check_positive_int(opt.decay_every_epochs, f"{prefix}.decay_every_epochs")
  else:
    checks.check_int(opt.decay_every_epochs, f"{prefix}.decay_every_epochs")


def check_optimization_config(config: Any, num_devices: int, prefix: str = "") -> None:
  """Validates `optimizer`, epochs, batch sizes (divisible by the devices) and periods.

  A positive `per_device_batch_size` (a config field where present) first sets
  `batch_size` to it times `num_devices`, so one config follows the device
  count of the job it runs in (the learning rate is not rescaled).
  """
  per_device = config.get("per_device_batch_size", 0)
  if per_device:
    checks.check_positive_int(per_device, f"{prefix}per_device_batch_size")
    config.batch_size = per_device * num_devices
  check_optimizer_config(config.optimizer, f"{prefix}optimizer")
  for key in ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps",
              "checkpoint_every_steps", "max_to_keep"):
    checks.check_positive_int(config[key], f"{prefix}{key}")
  checks.check_int(config.eval_every_steps, f"{prefix}eval_every_steps",
                   hint=" (0: evaluate only at the end)")
  for key in ("batch_size", "eval_batch_size"):
    mesh_lib.check_batch_size(config[key], num_devices, f"config.{prefix}{key}")


def check_model_config(model: Any, key: str = "model") -> None:
  """Validates a `model` section: a known model and attributes it has."""
  checks.check_choice(model.name, MODELS, f"{key}.name")
  fields = {f.name for f in dataclasses.fields(MODELS[model.name])} - {
      "parent", "name", "num_classes"}
  unknown = sorted(set(model.kwargs) - fields)
  if unknown:
    raise ValueError(f"config.{key}.kwargs has {unknown}, not attributes of "
                     f"{model.name}; valid: {sorted(fields)}.")
  hints = typing.get_type_hints(MODELS[model.name])
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


def check_train_config(config: Any, num_devices: int) -> None:
  """Validates a `train` config before any work; raises ValueError naming the key.

  Checks names against the valid choices (datasets, cue kinds, models,
  optimisers, schedules), every number's range (finite; cue_proportion in
  [0, 1], momentum in [0, 1), positive learning rate, non-negative weight
  decay), positive sizes and periods, batch sizes divisible by the device
  count, that the model accepts its kwargs, and that the batch fits the data.
  """
  checks.check_int(config.seed, "seed")
  check_data_config(config.data)
  check_model_config(config.model)
  check_optimization_config(config, num_devices)
  steps_of(config, dry_run_lib.num_train_examples(config.data))


def examples_or_all(value: int) -> int | None:
  """A config's example count, with -1 (the whole split) as None."""
  return None if value == -1 else value


def loader_args(data: Any) -> dict:
  """The keyword arguments of `pipeline.load_*` shared by every split of a `data` section."""
  return dict(seed=data.seed, simple_dataset=data.simple_dataset,
              data_dir=data.data_dir or None, download=data.download)


def load_data(data: Any) -> tuple[pipeline.CueSplit, dict[str, np.ndarray], np.ndarray]:
  """(training split, test views, test labels) of a config's `data` section."""
  data_args = loader_args(data)
  split = pipeline.load_train_split(data.dataset, data.cue, data.cue_proportion,
                                    num_examples=examples_or_all(data.num_train), **data_args)
  test_views, test_labels = pipeline.load_test_views(
      data.dataset, data.cue, num_examples=examples_or_all(data.num_test), **data_args)
  return split, test_views, test_labels


def make_optimizer(opt: Any, *, num_steps: int, steps_per_epoch: int,
                   learning_rate: float | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimiser, learning-rate schedule) of a config's `optimizer` section.

  `learning_rate` replaces the section's peak learning rate when given.
  """
  schedule = learning_rate_schedule(
      opt.schedule, opt.learning_rate if learning_rate is None else learning_rate,
      total_steps=num_steps, steps_per_epoch=steps_per_epoch,
      decay_every_epochs=opt.decay_every_epochs, decay_factor=opt.decay_factor)
  return sgd(schedule, momentum=opt.momentum, weight_decay=opt.weight_decay), schedule


def steps_of(config: Any, num_examples: int, prefix: str = "") -> tuple[int, int]:
  """(steps per epoch, total steps) for the config's batch size and epochs.

  `prefix` names the config section in the error (e.g. 'finetune.').
  """
  steps_per_epoch = num_examples // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.{prefix}batch_size={config.batch_size} exceeds the "
                     f"{num_examples} training examples: it makes no full batch.")
  return steps_per_epoch, config.num_epochs * steps_per_epoch


def batch_fn_for(split: pipeline.CueSplit, batch_size: int, seed: int,
                 mesh: jax.sharding.Mesh) -> Callable[[int], Batch]:
  """step -> the step's global batch, sharded over the mesh (this host loads its rows)."""
  rows = mesh_lib.process_rows(batch_size)

  def batch_fn(step):
    local = pipeline.batch_at_step(split, batch_size, seed=seed, step=step, rows=rows)
    return mesh_lib.shard_batch(local, mesh)

  return batch_fn


def shard_views(test_views: dict[str, np.ndarray], labels: np.ndarray, batch_size: int,
                mesh: jax.sharding.Mesh) -> counterfactual.ViewBatches:
  """The views stacked into masked batches, each batch sharded over the mesh."""
  rows = mesh_lib.process_rows(batch_size)
  return {name: mesh_lib.shard_batch({k: v[:, rows] for k, v in batches.items()}, mesh,
                                     batch_axis=1)
          for name, batches in counterfactual.stack_views(test_views, labels,
                                                          batch_size).items()}


def loop_options(config: Any, num_steps: int, steps_per_epoch: int, desc: str) -> LoopOptions:
  return LoopOptions(num_steps=num_steps, log_every=config.log_every_steps,
                     checkpoint_every=config.checkpoint_every_steps,
                     max_to_keep=config.max_to_keep, eval_every=config.eval_every_steps,
                     steps_per_epoch=steps_per_epoch, progress=config.progress, desc=desc)


@contextlib.contextmanager
def claimed(config: Any, workdir: str, layout: workdir_lib.Layout, overwrite: bool,
            inputs: dict | None = None) -> Iterator[dict]:
  """Holds the workdir for this config while inside (see `workdir.claim`); yields the config dict.

  `inputs` ({name: `run_identity(...)`}) are the finished runs the job reads;
  they are recorded with the config under 'inputs', so a relaunch after one of
  them was retrained in place is refused as a different config, never resumed
  or reported against the old one.

  In a multi-process job process 0 alone checks, locks and writes config.json
  (clearing the old run's `layout` when overwriting); the others wait for its
  outcome, so a refusal stops every process instead of leaving some waiting in
  a collective.
  """
  config_dict = workdir_lib.config_to_dict(config)
  if inputs:
    config_dict["inputs"] = workdir_lib.config_to_dict(inputs)
  if jax.process_count() == 1:
    with workdir_lib.claim(workdir, config_dict, layout, overwrite=overwrite):
      yield config_dict
    return
  with contextlib.ExitStack() as held:
    error = None
    if jax.process_index() == 0:
      try:
        held.enter_context(workdir_lib.claim(workdir, config_dict, layout, overwrite=overwrite))
      except Exception as e:  # re-raised below, after every process has heard
        error = e
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if error is not None:
      raise error
    if not ok:
      raise RuntimeError(f"Process 0 could not claim {workdir}; its error says why.")
    yield config_dict


def train_and_evaluate(config: Any, workdir: str, *, overwrite: bool = False) -> dict:
  """Trains a model on a cued dataset and evaluates it on the four views.

  Writes into workdir: config.json, checkpoints/<step>/ (orbax), metrics.jsonl
  (train metrics every log step, view metrics every eval step) and
  final_eval.json (view losses and accuracies of the last step). Resumes
  from the latest checkpoint when the workdir holds a run of the same config;
  refuses one of a different config unless overwrite=True (which deletes only
  that run's `LAYOUT`). The config is validated before the workdir is touched.

  Returns:
    The final_eval record.
  """
  if config.get("dry_run", False):
    return dry_run(config)
  mesh = mesh_lib.data_mesh()
  check_train_config(config, mesh.devices.size)
  with claimed(config, workdir, LAYOUT, overwrite) as config_dict:
    return _train_and_evaluate(config, workdir, mesh, config_dict)


def _train_and_evaluate(config: Any, workdir: str, mesh: jax.sharding.Mesh,
                        config_dict: dict) -> dict:
  # Data: every host builds the same split and takes its rows of each batch.
  split, test_views, test_labels = load_data(config.data)
  steps_per_epoch, num_steps = steps_of(config, len(split))
  model = get_model(config.model.name, datasets.NUM_CLASSES[config.data.dataset],
                    **config.model.kwargs)
  tx, schedule = make_optimizer(config.optimizer, num_steps=num_steps,
                                steps_per_epoch=steps_per_epoch)

  # Keys: init and step randomness from one seed, with integer tags.
  root = jax.random.key(config.seed)
  init_key, step_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
  sample = jnp.zeros((1,) + test_views["clean"].shape[1:], jnp.float32)
  init_fn = functools.partial(create_train_state, model, tx, init_key, sample)
  step_fn = functools.partial(train_step,
                              root_key=jax.device_put(step_key, mesh_lib.replicated(mesh)),
                              loss_fn=ClassificationLoss(model.apply), tx=tx)
  view_batches = shard_views(test_views, test_labels, config.eval_batch_size, mesh)
  eval_fn = view_eval_fn(lambda state: (model.apply, state.variables), view_batches)

  start = time.perf_counter()
  state = train_loop(init_fn, step_fn, batch_fn_for(split, config.batch_size, config.seed, mesh),
                     workdir, loop_options(config, num_steps, steps_per_epoch,
                                           f"train {config.model.name}"),
                     mesh=mesh, learning_rate_fn=schedule, eval_fn=eval_fn,
                     examples_per_step=config.batch_size)
  seconds = time.perf_counter() - start

  record = {
      "step": int(state.step),
      "views": views_of(eval_fn(state)),
      "checkpoint": os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, str(int(state.step))),
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
  if jax.process_index() == 0:
    workdir_lib.write_json_atomic(os.path.join(workdir, FINAL_EVAL_FILE), record)
  return record


def dry_run_train_step(config: Any, mesh: jax.sharding.Mesh, name: str = "train step"
                       ) -> tuple[nn.Module, TrainState, Batch, dry_run_lib.StepTiming]:
  """Builds a train config's model, optimiser and replicated state and times one step.

  Returns (model, state after the step, the zero batch, timing); no data is read.
  """
  steps_per_epoch, num_steps = steps_of(config, dry_run_lib.num_train_examples(config.data))
  model = get_model(config.model.name, datasets.NUM_CLASSES[config.data.dataset],
                    **config.model.kwargs)
  tx, _ = make_optimizer(config.optimizer, num_steps=num_steps, steps_per_epoch=steps_per_epoch)
  root = jax.random.key(config.seed)
  state = mesh_lib.replicate(create_train_state(
      model, tx, jax.random.fold_in(root, 0),
      jnp.zeros((1, *dry_run_lib.image_shape(config.data)), jnp.float32)), mesh)
  step = functools.partial(train_step, root_key=mesh_lib.replicate(jax.random.fold_in(root, 1),
                                                                   mesh),
                           loss_fn=ClassificationLoss(model.apply), tx=tx)
  state, timing, batch = dry_run_lib.time_on_zero_batches(
      name, step, state, config.data, mesh, global_batch=config.batch_size, num_steps=num_steps)
  return model, state, batch, timing


def dry_run(config: Any) -> dict:
  """The train task's dry run: mesh, placement, one timed step, the run's estimate."""
  mesh = mesh_lib.data_mesh()
  check_train_config(config, mesh.devices.size)
  _, state, batch, timing = dry_run_train_step(config, mesh)
  data = config.data
  return dry_run_lib.report(
      f"train {config.model.name} {dict(config.model.kwargs)} on {data.dataset} "
      f"({data.cue}, p={data.cue_proportion})", mesh,
      {"train state": state, "batch": batch}, [timing])


def view_eval_fn(model_of: Callable[[Any], tuple[batchnorm.ApplyFn, dict]],
                 view_batches: counterfactual.ViewBatches) -> Callable[[Any], dict]:
  """state -> {'eval/<view>/<loss|accuracy>': float}, computed once per step.

  `model_of(state)` gives (apply_fn, variables) to evaluate. The loop's last
  evaluation is also the final one: results are kept by step.
  """
  evaluated = {}

  def eval_fn(state):
    step = int(state.step)
    if step not in evaluated:
      apply_fn, variables = model_of(state)
      results = jax.device_get(counterfactual.evaluate_views(apply_fn, variables, view_batches))
      evaluated[step] = {f"eval/{view}/{k}": float(v)
                         for view, r in results.items() for k, v in r.items()}
    return evaluated[step]

  return eval_fn


def views_of(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
  """{'eval/cue/loss': ...} -> {'cue': {'loss': ...}}."""
  out: dict[str, dict[str, float]] = {}
  for key, value in metrics.items():
    _, view, name = key.split("/")
    out.setdefault(view, {})[name] = value
  return out


def run_identity(run: "TrainedModel") -> dict:
  """What identifies a finished run's model: its recorded config and final step.

  Not its path: a run retrained in place keeps the path, and a moved one keeps
  its identity.
  """
  return {"config": run.config, "step": int(os.path.basename(os.path.normpath(run.checkpoint)))}


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A finished `train` run, loaded from its workdir."""

  model: nn.Module
  params: Params
  batch_stats: Params
  config: dict
  checkpoint: str

  @property
  def variables(self) -> dict[str, Params]:
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}


def load_trained(workdir: str) -> TrainedModel:
  """The final model of a finished `train` run (its config.json and last checkpoint).

  Raises:
    FileNotFoundError: no finished run there (no config.json or final_eval.json:
      relaunch the train command to finish it).
  """
  config_path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.exists(config_path) or not os.path.exists(
      os.path.join(workdir, FINAL_EVAL_FILE)):
    raise FileNotFoundError(
        f"{workdir} holds no finished train run (needs {workdir_lib.CONFIG_FILE} and "
        f"{FINAL_EVAL_FILE}); run or resume the train task there first.")
  with open(config_path) as f:
    config = json.load(f)
  if config.get("task") != "train":
    raise ValueError(f"{workdir} holds a {config.get('task')!r} run, not a 'train' run.")
  model = get_model(config["model"]["name"], datasets.NUM_CLASSES[config["data"]["dataset"]],
                    **config["model"]["kwargs"])
  with checkpoint.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR)) as ckpt:
    step = ckpt.latest_step()
    state = ckpt.read(step)
  if not bool(finite.all_finite_jit(state)):
    raise finite.NonFiniteError(
        f"The train run in {workdir} ended with NaN or infinity in its checkpoint "
        f"{ckpt.step_dir(step)} (first at {finite.first_nonfinite_leaf(state)}): it diverged "
        "and cannot serve as a model. Retrain it (e.g. with a lower learning rate).")
  return TrainedModel(model=model, params=state["params"],
                      batch_stats=state.get("batch_stats", {}), config=config,
                      checkpoint=ckpt.step_dir(step))



