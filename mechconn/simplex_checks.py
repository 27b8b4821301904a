"""The checks of `mechconn.simplex`'s evaluation: its weights and inputs, and its results."""

from collections.abc import Mapping

import jax
import numpy as np

from mechconn import finite
from mechconn import input_checks
from mechconn import path_core
from mechconn import paths


def check_weights(weights, num_models: int) -> np.ndarray:
  """[K, N] weights whose rows lie on the simplex (>= 0, summing to 1 within 1e-6), checked."""
  w = np.asarray(weights, np.float64)
  if w.ndim != 2 or w.shape[1] != num_models or not w.shape[0]:
    raise ValueError(f"Simplex weights must be [K, N] with N = {num_models} models (one row per "
                     f"point), got shape {w.shape}.")
  if not np.all(np.isfinite(w)) or np.any(w < 0) or np.any(np.abs(w.sum(1) - 1) > 1e-6):
    bad = int(np.flatnonzero(~np.isfinite(w).all(1) | (w < 0).any(1)
                             | (np.abs(w.sum(1) - 1) > 1e-6))[0])
    raise ValueError(f"Simplex weights must be finite, non-negative and sum to 1 per row; row "
                     f"{bad} is {w[bad].tolist()}.")
  return w


def prepare(apply_fn, models, weights, eval_sets, bn_batches, objective, renormalize,
            strategy, where):
  """Checks; (models, weights [K, N], apply_fn, strategy, renormalize)."""
  models = path_core.check_points(models, where)
  paths.check_matching(models)
  weights = check_weights(weights, len(models))
  if not isinstance(eval_sets, Mapping) or not eval_sets:
    raise ValueError(f"{where}: eval_sets must be a non-empty {{name: stacked batches}}.")
  for name, batches in eval_sets.items():
    input_checks.check_batches(batches, f"eval set {name!r}", objective)
  if bn_batches is not None:
    input_checks.check_batches(bn_batches, "bn_batches", objective, weighted=False)
  apply_fn, _, strategy, renormalize = path_core.resolve(
      apply_fn, models, eval_sets, bn_batches, objective=objective, path="linear",
      renormalize=renormalize, strategy=strategy, where=where)
  return models, weights, apply_fn, strategy, renormalize


def check_results(out: dict, labels) -> None:
  """Raises NonFiniteError naming the points where statistics or metrics are not finite."""
  flags, ok = {}, np.asarray(jax.device_get(next(iter(out.values())).statistics_finite))
  if not ok.all():
    flags["the recomputed statistics at " + ", ".join(
        labels[k] for k in np.flatnonzero(~ok)[:5])] = False
  for name, result in out.items():
    for metric, values in jax.device_get(result.metrics).items():
      bad = np.flatnonzero(~np.isfinite(np.asarray(values)))
      if bad.size:
        flags[f"the {metric} on {name!r} at " + ", ".join(labels[k] for k in bad[:5])] = False
  finite.raise_if_any(flags, "Simplex evaluation")


def check_statistics_vary(result, labels) -> None:
  """Raises ValueError naming each layer whose statistics are constant at a model (vertex)."""
  w = np.asarray(jax.device_get(result.weights))
  vertex = np.flatnonzero((w == 1).any(axis=1))  # the models; none in the grid: every point
  rows = vertex if vertex.size else np.arange(len(w))
  constant = {layer: [labels[k] for k in rows if not flags[k]]
              for layer, flags in jax.device_get(result.statistics_vary or {}).items()}
  constant = {layer: at for layer, at in constant.items() if at}
  if constant:
    raise ValueError("Simplex evaluation refused: the statistics data (bn_batches) give zero "
                     "variance at " + "; ".join(f"layer {layer!r} of {', '.join(at[:3])}"
                                                for layer, at in constant.items())
                     + ": every unit is constant over those inputs (e.g. all-zero images), so "
                     "the layer outputs a constant. Pass real training inputs as bn_batches.")
