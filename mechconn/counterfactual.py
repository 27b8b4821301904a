"""Evaluate a model on the four counterfactual views of a test split.

The views (`mechconn.data.views`): `clean` (no cue), `cue` (own label's cue),
`rand_cue` (a random label's cue: high accuracy = ignores the cue) and
`rand_img` (own label's cue on another image: high accuracy = predicts from the
cue). A cue-reliant model scores high on cue and rand_img, low on clean and
rand_cue; a shape-reliant one the opposite, with rand_img near chance.
"""

import functools

import chex
import jax
import numpy as np

from mechconn import barriers
from mechconn import batchnorm
from mechconn.data import batching
from mechconn.data.views import VIEWS

Params = chex.ArrayTree
ViewBatches = dict[str, dict[str, np.ndarray]]


def stack_views(views: dict[str, np.ndarray], labels: np.ndarray, batch_size: int
                ) -> ViewBatches:
  """{view: stacked {'image', 'label', 'mask'} [N, B, ...]} (last batch padded, masked)."""
  unknown = sorted(set(views) - set(VIEWS))
  if unknown:
    raise ValueError(f"Unknown views {unknown}; valid views: {VIEWS}.")
  return {name: batching.stack_batches(images, labels, batch_size)
          for name, images in views.items()}


@functools.partial(jax.jit, static_argnames="apply_fn")
def evaluate_views(apply_fn: batchnorm.ApplyFn, variables: dict[str, Params],
                   view_batches: ViewBatches) -> dict[str, dict[str, jax.Array]]:
  """Loss and accuracy of one model on each view, in one compiled program.

  Args:
    apply_fn: `model.apply` taking `train=`.
    variables: {'params', 'batch_stats'?}; inference-mode BatchNorm.
    view_batches: `stack_views` output (arrays may be sharded over devices).

  Returns:
    {view: {'loss': scalar, 'accuracy': scalar}}, exact means over real examples.
  """
  out = {}
  for name, batches in view_batches.items():
    loss, accuracy = barriers.evaluate_variables(apply_fn, variables, batches)
    out[name] = {"loss": loss, "accuracy": accuracy}
  return out


def format_view_table(results: dict[str, dict[str, float]], title: str = "") -> str:
  """A one-row-per-view plain-text table of loss and accuracy."""
  lines = [title] if title else []
  lines.append(f"{'view':10s} {'loss':>8s} {'accuracy':>9s}")
  for name in VIEWS:
    if name in results:
      lines.append(f"{name:10s} {results[name]['loss']:8.4f} {results[name]['accuracy']:9.4f}")
  return "\n".join(lines)
