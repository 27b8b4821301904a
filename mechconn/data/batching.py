"""Stacking examples into fixed-size batches for scans over data.

A stacked batch set is a dict of arrays with two leading axes, [num_batches,
batch_size, ...]: 'image', 'label' and 'mask' (1.0 for real examples, 0.0 for
padding in the last batch), so means over a dataset are exact with a single
compiled batch shape.
"""

import functools

import numpy as np

Batches = dict[str, np.ndarray]


def pad_rows(a: np.ndarray, total: int) -> np.ndarray:
  """The first `total` rows of `a`, zero-padded at the end when `a` has fewer."""
  a = a[:total]
  if len(a) < total:
    a = np.concatenate([a, np.zeros((total - len(a),) + a.shape[1:], a.dtype)])
  return a


def valid_mask(num_real: int, total: int) -> np.ndarray:
  """float32 [total]: 1.0 for the first num_real rows, 0.0 for padding."""
  return (np.arange(total) < num_real).astype(np.float32)


def stack_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *,
                  drop_remainder: bool = False) -> Batches:
  """Splits (images, labels) into [N, batch_size, ...] arrays with a validity mask.

  Args:
    images: [num_examples, ...] array.
    labels: [num_examples] integer labels.
    batch_size: examples per batch.
    drop_remainder: drop the last partial batch instead of padding it (use for
      BatchNorm statistics, where padding would bias the moments).

  Returns:
    {'image': [N, B, ...], 'label': [N, B], 'mask': [N, B] float32}.
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if len(images) != len(labels):
    raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}.")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  n = len(images)
  num_batches = n // batch_size if drop_remainder else -(-n // batch_size)
  if num_batches == 0:
    raise ValueError(f"{n} examples make no full batch of {batch_size}.")
  total = num_batches * batch_size

  def stacked(a):
    a = pad_rows(a, total)
    return a.reshape((num_batches, batch_size) + a.shape[1:])

  return {"image": stacked(images), "label": stacked(labels),
          "mask": stacked(valid_mask(n, total))}


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  order.flags.writeable = False  # shared by the cache
  return order


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The example order of one epoch: `default_rng([seed, epoch]).permutation(n)`."""
  return _permutation(int(seed), int(epoch), int(num_examples))


def epoch_batches(num_examples: int, batch_size: int, *, seed: int, epoch: int) -> np.ndarray:
  """[steps_per_epoch, batch_size] example indices of one shuffled epoch's full batches.

  Batch i of the epoch is `epoch_permutation(seed, epoch)[i B:(i + 1) B]`; a
  partial last batch is dropped (one compiled shape). The one batching rule
  of every training loop here (`loop.train_loop`'s data, `loop.fit`,
  `finetune.fit_head`), so a step's batch depends only on (seed, step).
  """
  steps_per_epoch = num_examples // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{num_examples} examples make no batch of {batch_size}.")
  order = epoch_permutation(seed, epoch, num_examples)
  return order[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)


def batch_indices_at_step(num_examples: int, batch_size: int, *, seed: int, step: int
                          ) -> np.ndarray:
  """The example indices of global step `step` (0-based): batch step % S of epoch step // S."""
  steps_per_epoch = num_examples // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{num_examples} examples make no batch of {batch_size}.")
  epoch, i = divmod(step, steps_per_epoch)
  return epoch_batches(num_examples, batch_size, seed=seed, epoch=epoch)[i]
