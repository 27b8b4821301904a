"""Figures of the diagnostics along paths, from eval_path's records or the results' records.

Each function takes `{path name: diagnostics record}` (eval_path.json's
'diagnostics' entry; `diagnostics.records.path_record` makes the same records from
the library's results), draws a row of panels per path on a Figure of its own
(never pyplot), saves a PNG when given a file name, and returns the Figure.

  - `plot_layerwise`: heatmaps group x t of the loss above the chord when only
    that group moves (the rest at the start model), one per view;
  - `plot_features`: the LLFC cosine and the activation-pattern agreement with
    the start model along t, a line per site;
  - `plot_curvature`: the top Hessian eigenvalue and the trace along t;
  - `plot_calibration`: each view's loss before and after temperature
    calibration, and the fitted temperature.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mechconn import report

T_LABEL = "t"


def _grid(num_rows: int, num_cols: int, width: float = 3.4, height: float = 2.6):
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel  # lazily
  fig = Figure(figsize=(width * num_cols, height * num_rows))
  axes = np.asarray(fig.subplots(num_rows, num_cols, squeeze=False))
  return fig, axes


def _with(records: Mapping[str, dict], key: str) -> dict[str, dict]:
  chosen = {name: r for name, r in records.items() if r.get(key)}
  if not chosen:
    raise ValueError(f"No path's diagnostics record holds {key!r}; run that diagnostic first.")
  return chosen


def _finish(fig, path: str | None) -> Any:
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=100)
  return fig


def plot_layerwise(records: Mapping[str, dict], path: str | None = None, *,
                   views: Sequence[str] = ("clean", "cue")) -> Any:
  """Heatmaps (group x t) of each view's loss above the chord, one group moving."""
  records = _with(records, "layerwise")
  views = [v for v in views if v in next(iter(records.values()))["layerwise"]["excess_loss"]]
  fig, axes = _grid(len(records), len(views), width=3.8)
  for row, (name, record) in enumerate(records.items()):
    lw, ts = record["layerwise"], np.asarray(record["ts"])
    for col, view in enumerate(views):
      ax = axes[row, col]
      cells = np.asarray(lw["excess_loss"][view])
      image = ax.imshow(cells, aspect="auto", cmap="magma", origin="upper",
                        extent=(ts[0], ts[-1], len(cells) - 0.5, -0.5))
      ax.set_yticks(range(len(lw["groups"])), list(lw["groups"]), fontsize=7)
      ax.set_title(f"{name}: {view}", fontsize=9)
      ax.set_xlabel(T_LABEL)
      fig.colorbar(image, ax=ax, label="loss above chord")
  return _finish(fig, path)


def plot_features(records: Mapping[str, dict], path: str | None = None, *,
                  view: str = "clean") -> Any:
  """LLFC cosine and agreement with the start model's activation pattern along t, per site."""
  records = _with(records, "features")
  fig, axes = _grid(len(records), 2)
  for row, (name, record) in enumerate(records.items()):
    per_site, ts = record["features"]["views"][view], record["ts"]
    for site, values in per_site.items():
      axes[row, 0].plot(ts, values["cosine"], marker=".", label=site)
      axes[row, 1].plot(ts, values["agreement_a"], marker=".", label=site)
    axes[row, 0].set_title(f"{name}: LLFC cosine ({view})", fontsize=9)
    axes[row, 1].set_title(f"{name}: agreement with t = 0 ({view})", fontsize=9)
    for ax in axes[row]:
      ax.set_xlabel(T_LABEL)
      ax.grid(alpha=0.3)
    axes[row, 1].legend(fontsize=6, loc="lower left")
  return _finish(fig, path)


def plot_curvature(records: Mapping[str, dict], path: str | None = None) -> Any:
  """The top Hessian eigenvalue(s) and the Hutchinson trace of the loss along t."""
  records = _with(records, "curvature")
  fig, axes = _grid(len(records), 2)
  for row, (name, record) in enumerate(records.items()):
    curv, ts = record["curvature"], record["ts"]
    top = np.asarray(curv["top_eigenvalues"])
    for k in range(top.shape[1]):
      axes[row, 0].plot(ts, top[:, k], marker=".", label=f"lambda_{k + 1}")
    axes[row, 0].set_title(f"{name}: top Hessian eigenvalue", fontsize=9)
    if curv.get("trace") is not None:
      trace, sem = np.asarray(curv["trace"]), np.asarray(curv["trace_sem"])
      axes[row, 1].errorbar(ts, trace, yerr=sem, marker=".", capsize=2)
    axes[row, 1].set_title(f"{name}: Hessian trace (Hutchinson)", fontsize=9)
    for ax in axes[row]:
      ax.set_xlabel(T_LABEL)
      ax.grid(alpha=0.3)
  return _finish(fig, path)


def plot_calibration(records: Mapping[str, dict], path: str | None = None) -> Any:
  """Each view's loss before (solid) and after (dashed) calibration, and T(t)."""
  records = _with(records, "calibration")
  fig, axes = _grid(len(records), 2)
  for row, (name, record) in enumerate(records.items()):
    cal, ts = record["calibration"], record["ts"]
    for view, values in cal["views"].items():
      colour = report.VIEW_STYLES.get(view, (None, "-"))[0]
      axes[row, 0].plot(ts, values["loss"], color=colour, label=view)
      axes[row, 0].plot(ts, values["calibrated_loss"], color=colour, linestyle="--")
    axes[row, 0].set_title(f"{name}: loss, raw (solid) and calibrated (dashed)", fontsize=9)
    axes[row, 0].legend(fontsize=7)
    axes[row, 1].plot(ts, cal["temperature"], marker=".", color="black")
    axes[row, 1].set_title(f"{name}: fitted temperature", fontsize=9)
    for ax in axes[row]:
      ax.set_xlabel(T_LABEL)
      ax.grid(alpha=0.3)
  return _finish(fig, path)


PLOTS = {"layerwise": plot_layerwise, "features": plot_features, "curvature": plot_curvature,
         "calibration": plot_calibration}
