"""The resumable training loop, and a small in-memory `fit`.

- `train_loop(init_fn, step_fn, batch_fn, workdir, options, *, mesh)`: runs any
  pure step (`step.train_step` with its statics bound, `finetune.cbft_step`,
  a vmapped seed ensemble) to a number of steps on a data mesh, with orbax
  checkpoints, JSON-lines metrics and the same scalars in TensorBoard event
  files (`metric_writers`), a tqdm bar and auto-resume. Batches and
  step keys are functions of the step number, so a run killed at any step and
  resumed ends with the parameters of an uninterrupted run (bitwise, on the
  same machine). A step whose loss, gradient norm or parameter norm is not
  finite stops the run (`finite.NonFiniteError`, naming the step and the last
  good checkpoint); the whole state is checked before every save and every
  evaluation.
- `fit`: a loop without checkpoints on one device, for quick experiments.

Knows no task: what a step computes and where its data comes from are its
arguments.
"""

from collections.abc import Callable
import dataclasses
import functools
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from mechconn import checkpoint
from mechconn import finite
from mechconn import mesh as mesh_lib
from mechconn import metric_writers
from mechconn import rngs
from mechconn import step as step_lib
from mechconn import timing
from mechconn import trees
from mechconn import workdir as workdir_lib
from mechconn.data import batching
from mechconn.types import Batch, Metrics

CHECKPOINT_DIR = "checkpoints"
# What a resumable loop writes into its workdir (its task adds its result files).
LAYOUT = workdir_lib.Layout(files=(workdir_lib.METRICS_FILE, metric_writers.EVENT_FILES),
                            checkpoint_dirs=(CHECKPOINT_DIR,))


def stack_metrics(metrics: list[Metrics]) -> dict[str, np.ndarray]:
  """Per-step metric dicts -> {name: [steps, ...]} on the host (one transfer)."""
  return jax.device_get(trees.stack(metrics))


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
  # How configs recorded with checkpoints by earlier versions read today (the tasks':
  # `tasks.records.VOCABULARY`); the default compares every field as recorded.
  vocabulary: workdir_lib.Vocabulary = workdir_lib.EXACT


def _check_owner(ckpt: checkpoint.Checkpointer, step: int, run_config: dict | None,
                 vocabulary: workdir_lib.Vocabulary = workdir_lib.EXACT) -> None:
  """Refuses to resume from a checkpoint recorded with a config other than `run_config`.

  A checkpoint saved without a config (by `fit`-style callers, or by any run that passes
  none) is vouched for by the workdir's claim: its config.json is this run's.
  """
  recorded = ckpt.recorded_config(step)
  if run_config is None or recorded is None:
    return
  diff = workdir_lib.config_differences(recorded, run_config, vocabulary)
  if diff:
    raise checkpoint.CheckpointError(
        f"Checkpoint {ckpt.step_dir(step)} was written by a run of another config (differs in "
        f"{diff[:8]}); this run does not resume from it. It was left as is; move it (or the "
        "checkpoint directory) away, or use another --workdir.")


def train_loop(init_fn: Callable[[], Any], step_fn: Callable[[Any, Batch], tuple[Any, Metrics]],
               batch_fn: Callable[[int], Batch], workdir: str, options: LoopOptions, *,
               mesh: jax.sharding.Mesh, learning_rate_fn: Callable[[int], float] | None = None,
               eval_fn: Callable[[Any], dict[str, float]] | None = None,
               examples_per_step: int = 0, run_config: dict | None = None) -> Any:
  """Runs `step_fn` to `options.num_steps`, resuming from the workdir's latest checkpoint.

  Args:
    init_fn: () -> a fresh state with an integer `.step` (e.g. a TrainState);
      run under jit, replicated over the mesh.
    step_fn: (state, batch) -> (state, metrics), e.g. `train_step` with its
      statics bound; metrics must include 'loss'.
    batch_fn: step -> the global batch of that 0-based step, sharded over the
      mesh. Must be a pure function of the step for resumption to be exact.
    workdir: checkpoints go to workdir/checkpoints, metrics to
      workdir/metrics.jsonl (one JSON object per log/eval step) and, with
      tensorboardX installed, the same scalars at the same steps to TensorBoard
      event files in workdir (`metric_writers.LoopMetrics`).
    options: lengths and periods.
    mesh: the data mesh (`mesh.data_mesh()`).
    learning_rate_fn: step -> learning rate, logged.
    eval_fn: state -> flat dict of evaluation metrics, logged every
      `options.eval_every` steps and at the end.
    examples_per_step: for the logged examples/s.
    run_config: the run's config (a JSON-compatible dict), recorded with every
      checkpoint; a checkpoint recorded with another config is never resumed
      (`checkpoint.CheckpointError` naming the differing keys).

  Returns:
    The final state (also saved as the last checkpoint).
  """
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR),
                                 max_to_keep=options.max_to_keep)
  with timing.phase(timing.CHECKPOINTS):
    state = _restore_or_init(ckpt, init_fn, mesh, options, run_config)
  start = int(state.step)
  recorder = _Recorder(ckpt, workdir, options, start, learning_rate_fn=learning_rate_fn,
                       eval_fn=eval_fn, examples_per_step=examples_per_step,
                       run_config=run_config)
  try:
    with timing.phase(timing.TRAINING):
      for step in range(start, options.num_steps):
        with timing.phase(timing.DATA):
          batch = batch_fn(step)
        state, metrics = step_fn(state, batch)
        recorder.after_step(step, state, metrics)
  finally:
    with timing.phase(timing.CHECKPOINTS):
      recorder.close()
  return state


def _restore_or_init(ckpt: checkpoint.Checkpointer, init_fn: Callable[[], Any],
                     mesh: jax.sharding.Mesh, options: LoopOptions,
                     run_config: dict | None) -> Any:
  """The state to start from: the latest checkpoint (checked), else a fresh init."""
  replicated = mesh_lib.replicated(mesh)
  # Resume order:
  # 1. the latest complete checkpoint, checked leaf by leaf against an abstract
  #    state (no arrays allocated); a fresh init when there is none;
  # 2. metrics past the restored step are dropped (a killed run may have logged
  #    steps that it had not checkpointed): JSON lines truncated, TensorBoard's
  #    purged by the new event file (`metric_writers.LoopMetrics`, opened next);
  # 3. nothing else: batches and step keys are functions of the step number,
  #    and the optimiser's schedule counts in its restored state.
  latest = ckpt.latest_step()
  if latest is None:
    return jax.jit(init_fn, out_shardings=replicated)()
  _check_owner(ckpt, latest, run_config, options.vocabulary)
  abstract = mesh_lib.abstract_like(jax.eval_shape(init_fn), replicated)
  state = ckpt.restore(abstract, latest)
  if not bool(finite.all_finite_jit(state)):
    raise finite.NonFiniteError(
        f"Checkpoint {ckpt.step_dir(latest)} holds NaN or infinity (first at "
        f"{finite.first_nonfinite_leaf(state)}): it is not a state to resume from (mechconn "
        "never saves one; was it written or edited by something else?). It was left as "
        "is; move it away to resume from an earlier step.")
  if jax.process_index() == 0:  # said on the terminal: a resume is not a fresh start
    print(f"{options.desc}: resumed from {ckpt.step_dir(latest)} (step {latest} of "
          f"{options.num_steps})")
  return state


class _Recorder:
  """What `train_loop` does after each step: check, log, evaluate and save when due."""

  def __init__(self, ckpt: checkpoint.Checkpointer, workdir: str, options: LoopOptions,
               start: int, *, learning_rate_fn, eval_fn, examples_per_step, run_config):
    self.ckpt, self.options, self.run_config = ckpt, options, run_config
    self.learning_rate_fn, self.eval_fn = learning_rate_fn, eval_fn
    self.examples_per_step = examples_per_step
    # metrics.jsonl and TensorBoard, truncated/purged past `start`; process 0 writes.
    self.writer = metric_writers.LoopMetrics(workdir, start, enabled=jax.process_index() == 0)
    self.bar = tqdm.tqdm(total=options.num_steps, initial=start, desc=options.desc,
                         disable=not options.progress or jax.process_index() != 0,
                         dynamic_ncols=True, leave=False)
    self.pending, self.window_start, self.tick = [], start, time.perf_counter()

  def after_step(self, step: int, state: Any, metrics: Metrics) -> None:
    """Records step `step` (0-based; `state` is after it) and acts on what is due."""
    options, done = self.options, step + 1
    self.pending.append(metrics)  # stays on device until the next log, eval or checkpoint
    self.bar.update(1)
    last = done == options.num_steps
    log_now = done % options.log_every == 0 or last
    eval_now = self.eval_fn is not None and (
        (options.eval_every and done % options.eval_every == 0) or last)
    save_now = done % options.checkpoint_every == 0 or last
    if log_now or eval_now or save_now:  # read the window's metrics: finite?
      stacked = stack_metrics(self.pending)
      finite.raise_if_diverged(stacked, self.window_start, self.saved_so_far)
    if log_now:
      self.log(step, stacked)
    if eval_now or save_now:  # the steps' compute counts as training (`timing`)
      jax.block_until_ready(state)
    if eval_now:
      with timing.phase(timing.EVALUATION):
        self.check_state(state, done, "evaluating it")
        evaluated = self.eval_fn(state)
      with timing.phase(timing.OUTPUTS):
        self.writer.write({"step": done, **evaluated})
    if save_now:
      with timing.phase(timing.CHECKPOINTS):
        self.check_state(state, done, "saving it")
        self.ckpt.save(done, state, config=self.run_config)

  def log(self, step: int, stacked: dict[str, np.ndarray]) -> None:
    """Writes the window's mean metrics after `step`; starts the next window."""
    done, elapsed = step + 1, time.perf_counter() - self.tick
    record = {"step": done}
    if self.options.steps_per_epoch:
      record["epoch"] = round(done / self.options.steps_per_epoch, 4)
    record.update({f"train/{k}": float(np.mean(v)) for k, v in stacked.items()})
    if self.learning_rate_fn is not None:
      record["learning_rate"] = float(self.learning_rate_fn(step))
    if self.examples_per_step:
      record["examples_per_s"] = round(self.examples_per_step * len(self.pending) / elapsed, 1)
    with timing.phase(timing.OUTPUTS):
      self.writer.write(record)
    self.bar.set_postfix(loss=f"{record['train/loss']:.3f}",
                         acc=f"{record.get('train/accuracy', float('nan')):.3f}",
                         lr=f"{record.get('learning_rate', float('nan')):.3g}",
                         ex_s=f"{record.get('examples_per_s', 0):.0f}")
    self.pending, self.window_start, self.tick = [], done, time.perf_counter()

  def saved_so_far(self) -> str:
    """The last good checkpoint, for an error message (waits for pending saves)."""
    self.ckpt.wait()
    last_good = self.ckpt.latest_step()
    return (f"the last good checkpoint is {self.ckpt.step_dir(last_good)}"
            if last_good is not None else "no checkpoint had been written")

  def check_state(self, state: Any, done: int, why: str) -> None:
    """Raises unless every leaf of `state` is finite, before it is saved or evaluated."""
    # Metrics cover params and gradients; this also covers batch_stats and the
    # optimiser state: one compiled reduction, before anything is saved or evaluated.
    if not bool(finite.all_finite_jit(state)):
      raise finite.NonFiniteError(
          f"The training state after step {done} holds NaN or infinity (first at "
          f"{finite.first_nonfinite_leaf(state)}), found before {why}; it was not saved. "
          f"{self.saved_so_far().capitalize()}.")

  def close(self) -> None:
    """Closes the bar, the metrics files (flushed) and the checkpointer, also after an error."""
    try:
      self.bar.close()
      self.writer.close()
    finally:
      self.ckpt.close()


def fit(model: nn.Module, tx: optax.GradientTransformation, images: np.ndarray,
        labels: np.ndarray, *, batch_size: int, num_epochs: int, seed: int,
        progress: bool = True, desc: str = "train") -> tuple[step_lib.TrainState, list[dict]]:
  """Trains `model` in memory from a fresh init; returns (state, per-epoch metrics).

  No checkpoints, one device: for small experiments and the quickstart. Partial
  last batches are dropped (one compiled shape; `batching.epoch_batches`).
  Images holding NaN or infinity are refused up front; a non-finite loss,
  gradient norm or parameter norm raises `finite.NonFiniteError` naming the
  step (read once per epoch). Keys: `rngs.init_key(seed)`, `rngs.step_key(seed)`.
  """
  if len(images) // batch_size == 0:
    raise ValueError(f"{len(images)} examples make no batch of {batch_size}.")
  bad = ~np.isfinite(images.reshape(len(images), -1)).all(axis=1)
  if bad.any():
    raise finite.NonFiniteError(f"fit: {int(bad.sum())} of the {len(images)} training images "
                                f"hold NaN or infinity (first: index {int(np.argmax(bad))}).")
  state = step_lib.create_train_state(model, tx, rngs.init_key(seed), jnp.asarray(images[:2]))
  step_fn = functools.partial(step_lib.train_step,
                              loss_fn=step_lib.ClassificationLoss(model.apply), tx=tx)
  step_key = rngs.step_key(seed)
  history = []
  bar = tqdm.trange(num_epochs, desc=desc, disable=not progress, leave=False)
  for epoch in bar:
    epoch_metrics = []
    order = batching.epoch_batches(len(images), batch_size, seed=seed, epoch=epoch)
    for idx in order:
      batch = {"image": jnp.asarray(images[idx]), "label": jnp.asarray(labels[idx])}
      state, metrics = step_fn(state, batch, step_key)
      epoch_metrics.append(metrics)
    stacked = stack_metrics(epoch_metrics)
    finite.raise_if_diverged(stacked, epoch * len(order), lambda: "fit keeps no checkpoints")
    history.append({"epoch": epoch, **{k: float(np.mean(v)) for k, v in stacked.items()}})
    bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", acc=f"{history[-1]['accuracy']:.3f}")
  return state, history
