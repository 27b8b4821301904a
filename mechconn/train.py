"""A generic jitted training step and a small in-memory training loop.

`train_step` is one pure jitted function: state in, (state, metrics) out, the
state donated. `fit` drives it over epochs of an in-memory dataset with a
deterministic shuffle per epoch, which is all the quickstart needs.
"""

from collections.abc import Callable
import functools
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

Params = chex.ArrayTree
Batch = dict[str, jax.Array]


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
                       rng: jax.Array, sample_images: jax.Array) -> TrainState:
  """Initialises parameters from `rng` and the optimiser state."""
  variables = model.init(rng, sample_images, train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params))


def cross_entropy_loss(params: Params, batch_stats: Params, batch: Batch, *,
                       apply_fn: Callable[..., Any]) -> tuple[jax.Array, tuple[Params, jax.Array]]:
  """Mean cross-entropy in training mode; returns (loss, (new_batch_stats, logits))."""
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
    logits, updates = apply_fn(variables, batch["image"], train=True, mutable=["batch_stats"])
    new_batch_stats = updates["batch_stats"]
  else:
    logits = apply_fn(variables, batch["image"], train=True)
    new_batch_stats = batch_stats
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, (new_batch_stats, logits)


@functools.partial(jax.jit, static_argnames=("apply_fn", "tx"), donate_argnums=0)
def train_step(state: TrainState, batch: Batch, *, apply_fn: Callable[..., Any],
               tx: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on the cross-entropy of a batch; returns (new state, metrics)."""
  grad_fn = jax.value_and_grad(
      functools.partial(cross_entropy_loss, apply_fn=apply_fn), has_aux=True)
  (loss, (batch_stats, logits)), grads = grad_fn(state.params, state.batch_stats, batch)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss,
             "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
             "grad_norm": optax.tree.norm(grads)}
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state)
  return new_state, metrics


def sgd_cosine(learning_rate: float, total_steps: int, *, momentum: float = 0.9,
               weight_decay: float = 5e-4) -> optax.GradientTransformation:
  """SGD with momentum, weight decay added to the gradient (as torch's SGD), cosine to 0."""
  schedule = optax.cosine_decay_schedule(learning_rate, decay_steps=total_steps)
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(schedule, momentum=momentum))


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The example order of one epoch; depends only on (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def fit(model: nn.Module, tx: optax.GradientTransformation, images: np.ndarray,
        labels: np.ndarray, *, batch_size: int, num_epochs: int, seed: int,
        progress: bool = True, desc: str = "train") -> tuple[TrainState, list[dict]]:
  """Trains `model` from a fresh init; returns (state, per-epoch metrics).

  Partial last batches are dropped (one compiled shape). A non-finite loss
  raises with its epoch and step.
  """
  steps_per_epoch = len(images) // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{len(images)} examples make no batch of {batch_size}.")
  root = jax.random.key(seed)
  state = create_train_state(model, tx, jax.random.fold_in(root, 0), jnp.asarray(images[:2]))
  history = []
  bar = tqdm.trange(num_epochs, desc=desc, disable=not progress, leave=False)
  for epoch in bar:
    order = epoch_permutation(seed, epoch, len(images))
    sums = None
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      batch = {"image": jnp.asarray(images[idx]), "label": jnp.asarray(labels[idx])}
      state, metrics = train_step(state, batch, apply_fn=model.apply, tx=tx)
      sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
    epoch_metrics = {k: float(v) / steps_per_epoch for k, v in sums.items()}
    if not np.isfinite(epoch_metrics["loss"]):
      raise FloatingPointError(
          f"Non-finite training loss in epoch {epoch} (step {int(state.step)}).")
    epoch_metrics["epoch"] = epoch
    history.append(epoch_metrics)
    bar.set_postfix(loss=f"{epoch_metrics['loss']:.3f}", acc=f"{epoch_metrics['accuracy']:.3f}")
  return state, history
