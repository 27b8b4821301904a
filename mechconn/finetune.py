"""Fine-tuning a cue model on a small clean set: naive, lp, lp_ft, dfr and cbft.

Every method starts from the cue model theta_C and uses a small clean set
(no cue); CBFT also uses cue data. Methods (`METHODS`):
  - naive: full fine-tuning on the clean set (`step.ClassificationLoss`);
  - lp: last-layer retraining: the backbone frozen in inference mode, a fresh
    head trained on the backbone's penultimate features (`HeadLoss` on
    cached features, so an epoch costs a matmul);
  - lp_ft: lp, then naive from its result;
  - dfr: deep feature reweighting (Kirichenko et al. 2022): an L2-regularised
    logistic-regression head fitted (full batch, L-BFGS) on standardised
    features of a class-balanced clean set;
  - cbft: connectivity-based fine-tuning (Lubana et al. 2023): each step first
    takes a barrier step on a cue batch, |m - CE(f(x; t theta_C + (1 - t)
    theta))| with t = 0.5 + 0.5 clip(n, -0.5, 0.5), n ~ N(0, 1) (or a
    truncated Gaussian), the gradient reaching theta through the
    interpolation by autodiff; then a clean step on CE plus lambda / K times
    the invariance loss between the class means of clean and cue features;
  - scratch (a baseline, not a fine-tuning method): the same loop as naive from a
    fresh initialisation, on the same clean set: what the clean set alone gives.

`METHODS` declares each method as data (its head, its step, the settings it
reads). The step functions are pure and jitted, and run under
`loop.train_loop`.
"""

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mechconn import finite
from mechconn import objectives
from mechconn import paths
from mechconn import step as step_lib
from mechconn import timing
from mechconn import trees
from mechconn.data import batching
from mechconn.types import ApplyFn, Params

T_DISTRIBUTIONS = ("clip", "truncnorm")
HEADS = ("none", "lp", "dfr", "init")  # what a method's `head` may be
STEPS = ("none", "classification", "cbft")  # what a method's `step` may be


@dataclasses.dataclass(frozen=True)
class Method:
  """What a fine-tuning method is, as data.

  Attributes:
    head: the head it starts from: 'none' (the cue model's own), 'lp' (a fresh
      head trained on cached features, `fit_head`), 'dfr' (`fit_dfr_head` on
      a class-balanced subset), or 'init' (nothing from the cue model: a fresh
      initialisation of the whole network, `rngs.scratch_init_key(seed)`).
    step: the loop it runs afterwards: 'none', 'classification'
      (`step.train_step` on `step.ClassificationLoss`) or 'cbft' (`cbft_step`).
    sections: the settings it reads, named as the fine-tuning config's
      subsections (e.g. 'lp' for the head's epochs and learning rate): a
      change elsewhere does not change its numbers.
    learning_rate_from: the subsection whose `learning_rate` replaces the
      shared optimiser's peak rate for its loop, or None.
  """

  head: str
  step: str
  sections: tuple[str, ...]
  learning_rate_from: str | None = None

  def __post_init__(self):
    if self.head not in HEADS or self.step not in STEPS:
      raise ValueError(f"Method(head={self.head!r}, step={self.step!r}): head must be one of "
                       f"{list(HEADS)} and step one of {list(STEPS)}.")

  @property
  def runs_loop(self) -> bool:
    return self.step != "none"


METHODS = {
    "naive": Method(head="none", step="classification", sections=("naive",),
                    learning_rate_from="naive"),
    "lp": Method(head="lp", step="none", sections=("lp",)),
    "lp_ft": Method(head="lp", step="classification", sections=("lp",)),
    "dfr": Method(head="dfr", step="none", sections=("dfr",)),
    "cbft": Method(head="none", step="cbft", sections=("cbft",)),
    "scratch": Method(head="init", step="classification", sections=("scratch",),
                      learning_rate_from="scratch"),
}


def check_method(name: str) -> Method:
  """The method called `name`; raises naming the valid ones."""
  if name not in METHODS:
    raise ValueError(f"Unknown fine-tuning method {name!r}; valid methods: {list(METHODS)}.")
  return METHODS[name]


# --- Features and heads (lp, dfr). -----------------------------------------------


@functools.partial(jax.jit, static_argnames="apply_fn")
def _features(apply_fn, variables, images):
  return apply_fn(variables, images, train=False, return_features=True)[1]


@timing.timed(timing.EVALUATION)
def extract_features(apply_fn: ApplyFn, variables: dict, images: np.ndarray,
                     batch_size: int = 256) -> np.ndarray:
  """Penultimate features in inference mode, [N, F] float32 (the backbone is not changed)."""
  out = [np.asarray(_features(apply_fn, variables, jnp.asarray(images[i:i + batch_size])))
         for i in range(0, len(images), batch_size)]
  return np.concatenate(out).astype(np.float32)


@flax.struct.dataclass
class HeadLoss:
  """Cross-entropy of a linear head on cached features: batch {'feature', 'label'}."""

  def __call__(self, head, batch_stats, batch, rng):
    del rng
    logits = batch["feature"] @ head["kernel"] + head["bias"][None, :]
    means = objectives.mean_classification_metrics(logits, batch["label"])
    return means["loss"], (batch_stats, {"accuracy": means["accuracy"]})


def fresh_head(rng: jax.Array, num_features: int, num_classes: int) -> Params:
  """A head initialised as Flax's Dense (lecun normal kernel, zero bias)."""
  kernel = jax.nn.initializers.lecun_normal()(rng, (num_features, num_classes), jnp.float32)
  return {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}


@timing.timed(timing.TRAINING)
def fit_head(features: np.ndarray, labels: np.ndarray, num_classes: int, *, epochs: int,
             learning_rate: float, batch_size: int, seed: int, momentum: float = 0.9,
             weight_decay: float = 0.0) -> Params:
  """Last-layer retraining (lp): SGD with cosine decay on cached features, fresh head."""
  n = len(labels)
  batch_size = min(batch_size, n)
  steps_per_epoch = n // batch_size
  tx = step_lib.sgd_cosine(learning_rate, epochs * steps_per_epoch, momentum=momentum,
                           weight_decay=weight_decay)
  check_features(features, "fit_head", labels, num_classes)
  head = fresh_head(jax.random.key(seed), features.shape[1], num_classes)
  state = step_lib.fresh_state(head, tx)
  feats, labs = jnp.asarray(features), jnp.asarray(labels)
  key = jax.random.key(seed)
  for epoch in range(epochs):
    epoch_metrics = []
    for idx in batching.epoch_batches(n, batch_size, seed=seed, epoch=epoch):
      state, metrics = step_lib.train_step(state, {"feature": feats[idx], "label": labs[idx]},
                                           key, loss_fn=HeadLoss(), tx=tx)
      epoch_metrics.append(metrics)
    finite.raise_if_diverged(jax.device_get(trees.stack(epoch_metrics)),
                             epoch * steps_per_epoch, lambda: "fit_head keeps no checkpoints")
  return state.params


def check_features(features: np.ndarray, where: str, labels: np.ndarray | None = None,
                   num_classes: int | None = None) -> None:
  """Raises when cached features are not [N, F] and finite, or labels not N ints in range."""
  if np.ndim(features) != 2:
    raise ValueError(f"{where}: features must be [examples, features], got shape "
                     f"{np.shape(features)}.")
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (len(features),) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"{where}: labels must be {len(features)} integers (one per feature "
                       f"row), got {labels.dtype}{list(labels.shape)}.")
    if num_classes is not None and len(labels) and (labels.min() < 0 or
                                                    labels.max() >= num_classes):
      raise ValueError(f"{where}: labels must be in [0, {num_classes}), got "
                       f"[{labels.min()}, {labels.max()}].")
  bad = ~np.isfinite(features)
  if bad.any():
    raise finite.NonFiniteError(
        f"{where}: the features hold NaN or infinity in {int(bad.any(1).sum())} of "
        f"{len(features)} examples; the backbone's parameters or the images are not finite.")


def balanced_subset(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
  """Indices of a class-balanced subset: min class count examples of every class."""
  rng = np.random.default_rng(seed)
  per_class = min(int(np.sum(labels == c)) for c in range(num_classes))
  return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class,
                                            replace=False) for c in range(num_classes)]))


@timing.timed(timing.TRAINING)
def fit_dfr_head(features: np.ndarray, labels: np.ndarray, num_classes: int, *,
                 l2: float = 1e-2, max_iter: int = 500) -> Params:
  """DFR: L2-regularised multinomial logistic regression on standardised features.

  Minimises mean CE + l2 / 2 ||W||^2 over (W, b) by full-batch L-BFGS
  (optax.lbfgs); the standardisation is folded back into the returned head, so
  it applies to raw features: logits = features @ kernel + bias.
  """
  check_features(features, "fit_dfr_head", labels, num_classes)
  mean, std = features.mean(0), features.std(0) + 1e-6
  x = jnp.asarray((features - mean) / std)
  y = jnp.asarray(labels)

  head = {"kernel": jnp.zeros((x.shape[1], num_classes)), "bias": jnp.zeros((num_classes,))}
  carry = (head, _LBFGS.init(head))
  for _ in range(max_iter):
    new = _dfr_step(carry, x, y, l2=l2)
    done = optax.tree.norm(optax.tree.sub(new[0], carry[0])) < 1e-7
    carry = new
    if bool(done):
      break
  head = carry[0]
  kernel = head["kernel"] / jnp.asarray(std)[:, None]
  bias = head["bias"] - jnp.asarray(mean / std) @ head["kernel"]
  finite.raise_if_any({"the fitted head": finite.all_finite_jit((kernel, bias))},
                      "fit_dfr_head (L-BFGS)")
  return {"kernel": kernel, "bias": bias}


_LBFGS = optax.lbfgs()


def _dfr_objective(head: Params, x: jax.Array, y: jax.Array, l2: float) -> jax.Array:
  logits = x @ head["kernel"] + head["bias"][None, :]
  ce = jnp.mean(objectives.classification_metrics(logits, y)["loss"])
  return ce + 0.5 * l2 * jnp.sum(head["kernel"] ** 2)


@functools.partial(jax.jit, static_argnames="l2")
def _dfr_step(carry, x: jax.Array, y: jax.Array, *, l2: float):
  """One L-BFGS iteration of `fit_dfr_head` (compiled once per shape and l2, not per call)."""
  head, state = carry
  objective = functools.partial(_dfr_objective, x=x, y=y, l2=l2)
  value, grad = optax.value_and_grad_from_state(objective)(head, state=state)
  updates, state = _LBFGS.update(grad, state, head, value=value, grad=grad, value_fn=objective)
  return optax.apply_updates(head, updates), state


def with_head(params: Params, head: Params) -> Params:
  """params with the 'head' subtree replaced (the backbone's leaves are the same arrays)."""
  return {**params, "head": head}


# --- CBFT. ------------------------------------------------------------------------


def sample_t(rng: jax.Array, distribution: str = "clip") -> jax.Array:
  """t in [0.25, 0.75] around 0.5: 0.5 + 0.5 clip(n, -0.5, 0.5) ('clip', the official
  code), or 0.5 + 0.5 n with n ~ N(0, 1) truncated to [-0.5, 0.5] ('truncnorm', the
  paper's text)."""
  if distribution == "clip":
    n = jnp.clip(jax.random.normal(rng, ()), -0.5, 0.5)
  elif distribution == "truncnorm":
    n = jax.random.truncated_normal(rng, -0.5, 0.5, ())
  else:
    raise ValueError(f"Unknown t distribution {distribution!r}; valid: {list(T_DISTRIBUTIONS)}.")
  return 0.5 + 0.5 * n


def invariance_loss(features_clean: jax.Array, labels_clean: jax.Array,
                    features_cue: jax.Array, labels_cue: jax.Array, num_classes: int
                    ) -> jax.Array:
  """1/K sum_k || normalize(mean_k z_clean) - normalize(mean_k z_cue) ||^2.

  Class means within each batch; K counts the classes present in both batches
  (the others contribute nothing). 0 when every class mean points the same way.
  """
  def class_means(z, y):
    onehot = jax.nn.one_hot(y, num_classes, dtype=z.dtype)  # [B, K]
    counts = onehot.sum(0)
    return (onehot.T @ z) / jnp.maximum(counts, 1.0)[:, None], counts > 0

  def normalize(m):
    # m / max(||m||, eps), as torch's F.normalize, with a finite gradient at m = 0 (a
    # class absent from the batch, or whose features are all zero: the norm's
    # derivative there is 0/0 = NaN, and a masked-out NaN is still NaN). Elsewhere
    # bitwise the plain formula, values and gradients.
    nonzero = jnp.any(m != 0, axis=-1, keepdims=True)
    norm = jnp.where(nonzero, jnp.linalg.norm(jnp.where(nonzero, m, 1.0), axis=-1,
                                              keepdims=True), 0.0)
    return m / jnp.maximum(norm, 1e-12)

  mean_clean, has_clean = class_means(features_clean, labels_clean)
  mean_cue, has_cue = class_means(features_cue, labels_cue)
  both = (has_clean & has_cue).astype(features_clean.dtype)
  per_class = jnp.sum((normalize(mean_clean) - normalize(mean_cue)) ** 2, axis=-1)
  return jnp.sum(per_class * both) / jnp.maximum(both.sum(), 1.0)


@flax.struct.dataclass
class CBFTLoss:
  """The two CBFT objectives; `reference` are the cue model's params theta_C.

  Attributes:
    apply_fn: the model's apply (must support return_features=True).
    reference: theta_C, fixed.
    num_classes: K of the invariance loss.
    margin: m of the barrier loss (official: 1).
    invariance_weight: lambda (official: 1).
    t_distribution: 'clip' or 'truncnorm' (see `sample_t`).
    barrier_loss: False drops the barrier step (an ablation: the clean step alone).
  """

  apply_fn: ApplyFn = flax.struct.field(pytree_node=False)
  reference: Params
  num_classes: int = flax.struct.field(pytree_node=False)
  margin: float = flax.struct.field(pytree_node=False, default=1.0)
  invariance_weight: float = flax.struct.field(pytree_node=False, default=1.0)
  t_distribution: str = flax.struct.field(pytree_node=False, default="clip")
  barrier_loss: bool = flax.struct.field(pytree_node=False, default=True)

  def barrier_at(self, point, batch_stats, images, labels):
    """|m - CE(f(x; point), y)| in train-mode BatchNorm."""
    logits, _ = step_lib.apply_train_mode(self.apply_fn, point, batch_stats, images)
    ce = jnp.mean(objectives.classification_metrics(logits, labels)["loss"])  # float32
    return jnp.abs(self.margin - ce)

  def barrier(self, params, batch_stats, images, labels, t):
    """The barrier loss at t theta_C + (1 - t) theta, differentiable in theta.

    Returns (loss, batch_stats): the running statistics are not updated by
    this step (its batch statistics belong to the interpolated network).
    """
    point = paths.linear(params, self.reference, t)  # t = 0: theta, t = 1: theta_C
    return self.barrier_at(point, batch_stats, images, labels), batch_stats

  def clean(self, params, batch_stats, batch, invariance_on):
    """CE on the clean batch plus lambda x invariance between clean and cue features."""
    images = jnp.concatenate([batch["clean_image"], batch["cue_image"]])
    (logits, feats), new_stats = step_lib.apply_train_mode(self.apply_fn, params, batch_stats,
                                                           images, return_features=True)
    n = batch["clean_image"].shape[0]
    means = objectives.mean_classification_metrics(logits[:n], batch["clean_label"])
    ce = means["loss"]  # float32
    feats = feats.astype(jnp.float32)  # class means and norms in float32
    inv = invariance_loss(feats[:n], batch["clean_label"], feats[n:], batch["cue_label"],
                          self.num_classes)
    total = ce + self.invariance_weight * invariance_on * inv
    return total, (new_stats, {"clean_ce": ce, "invariance": inv,
                               "accuracy": means["accuracy"]})


@functools.partial(jax.jit, static_argnames=("tx", "warmup_steps"), donate_argnums=0)
def cbft_step(state: step_lib.TrainState, batch: dict, root_key: jax.Array, *, loss_fn: CBFTLoss,
              tx: optax.GradientTransformation, warmup_steps: int = 0):
  """One CBFT iteration: a barrier step on the cue batch, then a clean step.

  Both are optimiser steps of the same optimiser (as the official code's two
  `optimizer.step()` calls); the invariance term is off for the first
  `warmup_steps` iterations. batch: {'clean_image', 'clean_label',
  'cue_image', 'cue_label'}.
  """
  rng = jax.random.fold_in(root_key, state.step)
  t = sample_t(rng, loss_fn.t_distribution)
  params, stats, opt_state = state.params, state.batch_stats, state.opt_state
  barrier = jnp.zeros((), jnp.float32)
  if loss_fn.barrier_loss:  # static: the ablation without it traces no barrier step
    (barrier, stats), grads = jax.value_and_grad(loss_fn.barrier, has_aux=True)(
        params, stats, batch["cue_image"], batch["cue_label"], t)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  invariance_on = (state.step >= warmup_steps).astype(jnp.float32)
  (total, (stats, aux)), grads = jax.value_and_grad(loss_fn.clean, has_aux=True)(
      params, stats, batch, invariance_on)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics = {"loss": total, "barrier_loss": barrier, "t": t, **aux,
             "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
  return step_lib.TrainState(step=state.step + 1, params=params, batch_stats=stats,
                          opt_state=opt_state), metrics
