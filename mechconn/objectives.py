"""What is measured on a batch: objectives as data.

An `Objective` says which part of a batch is the model's input and what to
measure on the model's outputs: `metrics(outputs, batch)` returns
per-element values ({'loss': [B], 'accuracy': [B]} for a classifier; [B, L]
for a language model's tokens), and `weights` gives each element's weight
(the batch's 'mask' by default: 1 for a real example, 0 for padding). An
evaluation reduces every metric to its exact weighted mean over a whole set,

  mean_m = sum over batches and elements of (w * value_m) / sum of w,

so padding never counts and a set split into batches of any size gives the
same number. Each metric declares whether lower is better, so a path's
barriers (`barriers.PathEval.summary`) work for any metric: a lower-is-better
metric's barrier is its rise above the chord; a higher-is-better one's is
reported on its complement 1 - m when the objective names one (accuracy ->
'error'), else as its drop below the chord.

Built in:
  - `CLASSIFICATION` (the default everywhere): softmax cross-entropy 'loss'
    and 'accuracy' of logits [B, C] against integer 'label' [B], inputs
    'image' ('error' = 1 - accuracy);
  - `regression()`: squared and absolute error of outputs [B, ...] against
    'target' (mean over the output's trailing axes per example);
  - `next_token()`: a causal language model's token cross-entropy 'loss' and
    'accuracy' ('error') over sequences 'tokens' [B, L]: the model reads
    tokens[:, :-1], is scored on tokens[:, 1:], weighted by mask[:, 1:]
    (1 on the tokens that count, 0 on the prompt or padding); perplexity is
    exp(loss).

A user's objective is an `Objective` with their own `metrics` function, e.g.
a Huber loss:

  >>> huber = objectives.Objective(
  ...     name="huber", inputs="x",
  ...     metrics=lambda out, batch: {"huber": optax.huber_loss(out, batch["y"]).mean(-1)})

Objectives are hashable (frozen dataclasses of functions and strings), so
they pass to jitted code as static arguments.
"""

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

Batch = Mapping[str, Any]
MetricsFn = Callable[[Any, Batch], dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Objective:
  """What is measured on a batch.

  Attributes:
    name: for messages and records.
    metrics: metrics(outputs, batch) -> {name: per-element values}; each
      value has the shape of the batch's weights (one per example, or one
      per token), float.
    inputs: the batch key holding the model's input, or inputs(batch) ->
      the model's input.
    weights: the batch key holding each element's weight (>= 0; 0 is
      padding), or weights(batch) -> weights.
    higher_is_better: names of the metrics for which higher is better.
    target_keys: the batch keys `metrics` reads (checked to be present).
    complements: (metric, name) pairs: the barrier of a higher-is-better
      metric in [0, 1] is reported on 1 - metric under this name (accuracy,
      'error'); `PathEval` exposes the complement as well.
    check_targets: check_targets(batch, num_outputs) -> bool array of the
      weights' shape, True where an element's target is valid (a label in
      [0, number of classes), a token inside the vocabulary); checked on the
      elements of positive weight before an evaluation. None: nothing to
      check beyond finiteness.
  """

  name: str
  metrics: MetricsFn
  inputs: str | Callable[[Batch], Any] = "image"
  weights: str | Callable[[Batch], jax.Array] = "mask"
  higher_is_better: tuple[str, ...] = ()
  complements: tuple[tuple[str, str], ...] = ()
  target_keys: tuple[str, ...] = ()
  check_targets: Callable[[Batch, int], jax.Array] | None = None

  def inputs_of(self, batch: Batch) -> Any:
    """The model's input in one batch."""
    return self.inputs(batch) if callable(self.inputs) else batch[self.inputs]

  def weights_of(self, batch: Batch) -> jax.Array:
    """Each element's weight in one batch, float32."""
    w = self.weights(batch) if callable(self.weights) else batch[self.weights]
    return jnp.asarray(w).astype(jnp.float32)

  def required_keys(self, inputs_only: bool = False) -> tuple[str, ...]:
    """The batch keys the objective reads by name (`inputs`, `weights`, `target_keys`)."""
    named = (self.inputs,) if inputs_only else (self.inputs, self.weights, *self.target_keys)
    return tuple(dict.fromkeys(k for k in named if isinstance(k, str)))


def weighted_sums(objective: Objective, outputs, batch: Batch) -> dict[str, jax.Array]:
  """{metric: sum of weight * value over the batch} and '_weight': the sum of the weights.

  The sums an evaluation accumulates over batches; float32.
  """
  w = objective.weights_of(batch)
  values = objective.metrics(outputs, batch)
  sums = {}
  for name, v in values.items():
    if jnp.shape(v) != w.shape:
      raise ValueError(f"Objective {objective.name!r}: metric {name!r} has shape "
                       f"{jnp.shape(v)} but the batch's weights have shape {w.shape}; "
                       "a metric gives one value per weighted element.")
    sums[name] = jnp.sum(jnp.asarray(v, jnp.float32) * w)
  sums[WEIGHT] = jnp.sum(w)
  return sums


WEIGHT = "_weight"  # the key of the summed weights in `weighted_sums`


# --- Built-in objectives. ---------------------------------------------------------


def classification_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Per-element softmax cross-entropy 'loss' and 'accuracy' of logits [..., C], labels [...].

  loss = -log softmax(logits)[label], in float32 for bfloat16 models too;
  accuracy = 1.0 where argmax(logits) == label, else 0.0 (float32). The one
  definition behind `CLASSIFICATION`, `next_token()` and the training losses
  (`step.ClassificationLoss`, `step.NextTokenLoss`, curves, fine-tuning).
  """
  return {"loss": optax.softmax_cross_entropy_with_integer_labels(
              logits.astype(jnp.float32), labels),
          "accuracy": (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)}


def mean_classification_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """`classification_metrics` averaged over every element: {'loss': [], 'accuracy': []}."""
  return {name: jnp.mean(value) for name, value in classification_metrics(logits, labels).items()}


def _classification_metrics(logits, batch):
  return classification_metrics(logits, batch["label"])


def _labels_in_range(batch, num_outputs):
  labels = batch["label"]
  return (labels >= 0) & (labels < num_outputs)


CLASSIFICATION = Objective(
    name="classification", metrics=_classification_metrics, inputs="image", weights="mask",
    higher_is_better=("accuracy",), complements=(("accuracy", "error"),), target_keys=("label",),
    check_targets=_labels_in_range)


def _regression_metrics(target_key, outputs, batch):
  outputs = jnp.asarray(outputs, jnp.float32)
  diff = outputs - jnp.asarray(batch[target_key], jnp.float32).reshape(outputs.shape)
  axes = tuple(range(1, diff.ndim))
  return {"squared_error": jnp.mean(jnp.square(diff), axis=axes),
          "absolute_error": jnp.mean(jnp.abs(diff), axis=axes)}


@dataclasses.dataclass(frozen=True)
class _RegressionMetrics:
  target: str

  def __call__(self, outputs, batch):
    return _regression_metrics(self.target, outputs, batch)


def regression(inputs: str | Callable = "x", target: str = "target",
               weights: str | Callable = "mask") -> Objective:
  """Squared and absolute error of outputs [B, ...] against batch[target], per example.

  'squared_error' is the mean over an example's output entries of
  (output - target)^2 (so its set mean is the MSE); 'absolute_error' the
  same with |output - target|. Both lower is better.

  Example:
    >>> objective = objectives.regression(inputs="x", target="y")
    >>> batches = {"x": x_NxBxD, "y": y_NxBx1, "mask": mask_NxB}
  """
  return Objective(name="regression", metrics=_RegressionMetrics(target), inputs=inputs,
                   weights=weights, target_keys=(target,))


@dataclasses.dataclass(frozen=True)
class _NextTokenInputs:
  tokens: str

  def __call__(self, batch):
    return batch[self.tokens][:, :-1]


@dataclasses.dataclass(frozen=True)
class _NextTokenWeights:
  mask: str

  def __call__(self, batch):
    return batch[self.mask][:, 1:]


@dataclasses.dataclass(frozen=True)
class _NextTokenMetrics:
  tokens: str

  def __call__(self, logits, batch):
    return classification_metrics(logits, batch[self.tokens][:, 1:])


@dataclasses.dataclass(frozen=True)
class _TokensInRange:
  tokens: str

  def __call__(self, batch, num_outputs):
    tokens = batch[self.tokens]
    valid = (tokens >= 0) & (tokens < num_outputs)
    return valid[:, 1:] & valid[:, :-1]  # the target and the token read before it


def next_token(tokens: str = "tokens", mask: str = "mask") -> Objective:
  """Next-token cross-entropy and accuracy of a causal language model.

  The model reads tokens[:, :-1] and returns logits [B, L - 1, V]; position i
  is scored on token i + 1 with weight `mask[:, 1:][i]` (so mask marks the
  tokens that count as targets: 0 on padding, and on a prompt that is not
  to be predicted). 'loss' is the mean token cross-entropy (perplexity =
  exp(loss)), 'accuracy' the fraction of tokens predicted by the argmax
  ('error' = 1 - accuracy).

  Example:
    >>> objective = objectives.next_token()
    >>> batches = {"tokens": tokens_NxBxL, "mask": mask_NxBxL}
  """
  return Objective(name="next_token", metrics=_NextTokenMetrics(tokens),
                   inputs=_NextTokenInputs(tokens), weights=_NextTokenWeights(mask),
                   higher_is_better=("accuracy",), complements=(("accuracy", "error"),),
                   target_keys=(tokens, mask), check_targets=_TokensInRange(tokens))


def check_objective(objective) -> Objective:
  """Raises TypeError unless `objective` is an Objective (names what was given)."""
  if not isinstance(objective, Objective):
    raise TypeError("objective must be a mechconn.objectives.Objective (e.g. "
                    "objectives.CLASSIFICATION, objectives.regression(), "
                    f"objectives.next_token()); got {type(objective).__name__}.")
  return objective
