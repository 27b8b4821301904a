"""The pure training step: state, losses' contract, `train_step`, optimisers.

- `TrainState`: step, params, batch_stats and optimiser state (a pytree).
- `train_step(state, batch, root_key, *, loss_fn, tx) -> (state, metrics)`:
  one jitted, state-donating step on any `types.LossFn`; its randomness is
  `fold_in(root_key, step)`, so it depends only on the root key and the step
  number.
- `ClassificationLoss`: mean softmax cross-entropy in training mode;
  `NextTokenLoss`: a causal language model's masked next-token cross-entropy.
- `learning_rate_schedule`, `sgd`: torch-style SGD with the paper's schedules;
  `adamw` (a language model's optimiser, with a warmed-up cosine).

Imports only jax, flax, optax and mechconn's pure helpers (types, trees,
objectives): the losses built on it (curves, fine-tuning) stay pure. The loop
that runs a step with checkpoints is `mechconn.loop`.
"""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mechconn import objectives
from mechconn import trees
from mechconn.types import ApplyFn, Batch, LossFn, Metrics, Params, PRNGKey

SCHEDULES = ("constant", "cosine", "step", "warmup_cosine")
OPTIMIZERS = ("sgd", "adamw")


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
    return trees.variables_of(self.params, self.batch_stats)


def fresh_state(params: Params, tx: optax.GradientTransformation,
                batch_stats: Params | None = None) -> TrainState:
  """A state at step 0 holding `params` (and `batch_stats`) with a fresh optimiser state."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats={} if batch_stats is None else batch_stats,
                    opt_state=tx.init(params))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       rng: PRNGKey, sample_images: jax.Array) -> TrainState:
  """Initialises parameters from `rng` and the optimiser state."""
  variables = model.init(rng, sample_images, train=False)
  return fresh_state(variables["params"], tx, variables.get("batch_stats", {}))


def apply_train_mode(apply_fn: ApplyFn, params: Params, batch_stats: Params,
                     images: jax.Array, **apply_kwargs) -> tuple[jax.Array, Params]:
  """Outputs in training mode and the updated batch_stats (unchanged when there are none).

  `apply_kwargs` go to `apply_fn` (e.g. `return_features=True`).
  """
  variables = trees.variables_of(params, batch_stats)
  if "batch_stats" not in variables:
    return apply_fn(variables, images, train=True, **apply_kwargs), batch_stats
  outputs, updates = apply_fn(variables, images, train=True, mutable=["batch_stats"],
                              **apply_kwargs)
  return outputs, updates["batch_stats"]


@flax.struct.dataclass
class ClassificationLoss:
  """Mean softmax cross-entropy of `apply_fn` in training mode (a `LossFn`).

  A pytree with no leaves: `apply_fn` is static, so a step bound to equal
  losses compiles once.
  """

  apply_fn: ApplyFn = flax.struct.field(pytree_node=False)

  def __call__(self, params, batch_stats, batch, rng):
    del rng  # deterministic models; dropout-like layers would take it here
    logits, new_batch_stats = apply_train_mode(self.apply_fn, params, batch_stats,
                                               batch["image"])
    means = objectives.mean_classification_metrics(logits, batch["label"])  # float32
    return means["loss"], (new_batch_stats, {"accuracy": means["accuracy"]})


@flax.struct.dataclass
class NextTokenLoss:
  """A causal language model's next-token cross-entropy in training mode (a `LossFn`).

  On a batch {'tokens': [B, L], 'mask': [B, L]} the model reads tokens[:, :-1]
  and position i is scored on token i + 1 with weight `w_i = mask[:, 1:][i]`:
  loss = sum(w * CE) / sum(w), and the accuracy of the argmax over the same
  targets (what `objectives.next_token` measures in an evaluation).
  `apply_fn` takes `train=` (a model without it goes through
  `adapters.without_train`); static, as `ClassificationLoss`'s.
  """

  apply_fn: ApplyFn = flax.struct.field(pytree_node=False)

  def __call__(self, params, batch_stats, batch, rng):
    del rng  # deterministic models
    tokens, weights = batch["tokens"], batch["mask"][:, 1:].astype(jnp.float32)
    logits, new_batch_stats = apply_train_mode(self.apply_fn, params, batch_stats,
                                               tokens[:, :-1])
    per_token = objectives.classification_metrics(logits, tokens[:, 1:])  # float32
    count = jnp.sum(weights)
    return jnp.sum(weights * per_token["loss"]) / count, (
        new_batch_stats, {"accuracy": jnp.sum(weights * per_token["accuracy"]) / count})


@functools.partial(jax.jit, static_argnames="tx", donate_argnums=0)
def train_step(state: TrainState, batch: Batch, root_key: PRNGKey, *, loss_fn: LossFn,
               tx: optax.GradientTransformation) -> tuple[TrainState, Metrics]:
  """One optimiser step on `loss_fn`; returns (new state, metrics).

  The state is donated (its buffers are reused for the new state). The step's
  key is `fold_in(root_key, state.step)`, so randomness depends only on the
  root key and the step number: a resumed run draws what an uninterrupted one
  draws. Metrics: the loss, the loss's own metrics, and the gradient and
  parameter norms (one reduction each over every leaf: a NaN anywhere shows).
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
                           decay_factor: float = 0.1, warmup_steps: int = 0) -> optax.Schedule:
  """An optax schedule: 'constant', 'cosine' (to 0 at total_steps), 'step' or 'warmup_cosine'.

  'step' multiplies the rate by `decay_factor` every `decay_every_epochs`
  epochs (the paper's x0.1 every 40 epochs), as torch's StepLR per epoch.
  'warmup_cosine' rises linearly from 0 to `learning_rate` over `warmup_steps`,
  then decays as a cosine to 0 at total_steps.
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
  if kind == "warmup_cosine":
    if not 0 <= warmup_steps < total_steps:
      raise ValueError(f"A 'warmup_cosine' schedule needs 0 <= warmup_steps < total_steps, got "
                       f"warmup_steps={warmup_steps}, total_steps={total_steps}.")
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, total_steps)
  raise ValueError(f"Unknown schedule {kind!r}; valid schedules: {SCHEDULES}.")


def sgd(schedule: optax.ScalarOrSchedule, *, momentum: float = 0.9,
        weight_decay: float = 5e-4) -> optax.GradientTransformation:
  """SGD with momentum; weight decay added to the gradient first, as torch.optim.SGD."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(schedule, momentum=momentum))


def adamw(schedule: optax.ScalarOrSchedule, *, b1: float = 0.9,
          weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Adam with decoupled weight decay (`optax.adamw`; weight_decay 0 is Adam)."""
  return optax.adamw(schedule, b1=b1, weight_decay=weight_decay)


@functools.lru_cache(maxsize=64)  # one object per recipe: steps compiled with it are reused
def sgd_cosine(learning_rate: float, total_steps: int, *, momentum: float = 0.9,
               weight_decay: float = 5e-4) -> optax.GradientTransformation:
  """`sgd` with a cosine schedule from `learning_rate` to 0 over total_steps."""
  return sgd(learning_rate_schedule("cosine", learning_rate, total_steps=total_steps),
             momentum=momentum, weight_decay=weight_decay)
