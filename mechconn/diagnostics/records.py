"""The diagnostics' results as JSON records: what eval_path.json holds and `plots` draws.

  >>> record = records.path_record(ts, layerwise=lw, features=fc, curvature=c, calibration=cp)
  >>> plots.plot_layerwise({"linear": record}, "layerwise.png")

Every array becomes a list of floats; each record keeps the result's own
`summary()` beside the curves.
"""

from typing import Any

import jax
import numpy as np


def _lists(tree) -> Any:
  return jax.tree.map(lambda x: np.asarray(x).tolist(), jax.device_get(tree))


def layerwise_record(lw) -> dict:
  """A `layerwise.LayerwiseBarriers` as {'groups', 'barriers', 'excess_loss', 'excess_error'}.

  'excess_*': {view: groups x t} the barrier curve minus its chord with only
  that group moving and the rest at the first point (the heatmap's cells).
  """
  return {"groups": {g: list(m) for g, m in lw.members.items()}, "barriers": lw.summary(),
          "excess_loss": {v: lw.excess(v, "loss").tolist() for v in lw.metrics},
          "excess_error": {v: lw.excess(v, "error").tolist() for v in lw.metrics}}


def features_record(fc) -> dict:
  """A `features.FeatureConnectivity` as {'sites', 'summary', 'views': {view: {site: curves}}}."""
  return {"sites": list(fc.sites), "summary": fc.summary(),
          "views": {v: {site: {"cosine": _lists(fc.cosine[v][site]),
                               "agreement_a": _lists(fc.agreement_a[v][site]),
                               "agreement_b": _lists(fc.agreement_b[v][site])}
                        for site in fc.sites} for v in fc.cosine}}


def curvature_record(c) -> dict:
  """A `curvature.Curvature` as its curves (top eigenvalues K x n, trace) and summary."""
  return {"top_eigenvalues": _lists(c.top_eigenvalues),
          "trace": None if c.trace is None else _lists(c.trace),
          "trace_sem": None if c.trace_sem is None else _lists(c.trace_sem),
          "per_group": _lists(c.per_group), "num_parameters": c.num_parameters,
          "summary": c.summary()}


def calibration_record(cp) -> dict:
  """A `calibration.CalibratedPath` as T(t), each view's raw and calibrated loss, summary."""
  return {"temperature": _lists(cp.temperature), "at_bound": _lists(cp.at_bound),
          "summary": cp.summary(),
          "views": {v: {"loss": _lists(cp.raw[v].loss),
                        "calibrated_loss": _lists(cp.calibrated[v].loss)} for v in cp.raw}}


def path_record(ts, *, layerwise=None, features=None, curvature=None, calibration=None) -> dict:
  """One path's diagnostics record from the results given (the others left out)."""
  makers = {"layerwise": layerwise_record, "features": features_record,
            "curvature": curvature_record, "calibration": calibration_record}
  given = {"layerwise": layerwise, "features": features, "curvature": curvature,
           "calibration": calibration}
  return {"ts": np.asarray(ts).tolist(),
          **{k: makers[k](v) for k, v in given.items() if v is not None}}
