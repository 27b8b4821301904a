"""Figures for people: example grids of the views; loss and accuracy along paths.

The path figures take the library's results as they come and the tasks' records:

    >>> result = barriers.evaluate_path(apply_fn, (params_a, params_b), ts, batches)
    >>> report.plot_path(result, "path.png")          # loss and accuracy along t
    >>> views = barriers.evaluate_path_on_sets(...)   # {view: PathEval}
    >>> report.plot_path({"linear": views, "aligned": aligned_views}, "paths.png")

Every function returns its matplotlib `Figure` (shown by a notebook as a cell's
value) and saves it as a PNG when given a file name. Figures are drawn on a
`matplotlib.figure.Figure` of their own, never through pyplot, so a notebook's
backend and open figures are left as they are.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mechconn import path_core

VIEW_STYLES = {"clean": ("tab:blue", "-"), "cue": ("tab:orange", "-"),
               "rand_cue": ("tab:green", "--"), "rand_img": ("tab:red", "--")}
T_LABEL = "t  (0: start model, 1: end model)"


def _figure(**kwargs) -> Any:
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel  # lazily
  return Figure(**kwargs)


def _saved(fig: Any, path: str | None, dpi: int) -> Any:
  if path is not None:
    fig.savefig(path, dpi=dpi)
  return fig


def displayable(images: np.ndarray) -> np.ndarray:
  """Model inputs -> RGB in [0, 1] for display.

  Complex images live in [-1, 1]; the top half of a 64-row Dominoes image is
  the simple image in [0, 1] and is shown as it is.
  """
  images = np.asarray(images, np.float32)
  out = (images + 1.0) / 2.0
  if images.shape[1] == 2 * images.shape[2]:
    half = images.shape[1] // 2
    out[:, :half] = images[:, :half]
  return np.clip(out, 0.0, 1.0)


def save_view_grid(views: dict[str, np.ndarray], labels: np.ndarray, path: str | None, *,
                   num_examples: int = 8, class_names=None) -> Any:
  """A grid of examples, one row per view, the same `num_examples` test examples in each.

  Args:
    views: {view name: images [N, H, W, 3]} (e.g. from `views.box_views`).
    labels: [N] labels, shown above each example.
    path: where to write the PNG (None: not saved).
    num_examples: columns.
    class_names: optional names indexed by label.

  Returns:
    The figure.
  """
  names = list(views)
  height, width = next(iter(views.values())).shape[1:3]
  fig = _figure(figsize=(1.1 * num_examples, 1.25 * len(names) * height / width))
  axes = fig.subplots(len(names), num_examples, squeeze=False)
  for row, name in enumerate(names):
    shown = displayable(views[name][:num_examples])
    for col in range(num_examples):
      ax = axes[row, col]
      ax.imshow(shown[col], interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if row == 0:
        label = int(labels[col])
        ax.set_title(class_names[label] if class_names else str(label), fontsize=7)
      if col == 0:
        ax.set_ylabel(name, fontsize=8)
  fig.tight_layout()
  return _saved(fig, path, 100)


# Path results, as the figures read them.


def _curves_of(result: Any) -> dict[str, np.ndarray]:
  """{metric: [K] values} of a `PathEval`, or of a record's curves ({'loss': [...], ...};
  its other entries, e.g. 'summary', are ignored)."""
  items = result.metrics.items() if isinstance(result, path_core.PathEval) else result.items()
  curves = {}
  for name, values in items:
    if isinstance(values, (list, tuple)) or hasattr(values, "shape"):
      values = np.asarray(values)
      if values.ndim == 1 and len(values) and np.issubdtype(values.dtype, np.number):
        curves[name] = values.astype(np.float64)
  return curves


def _is_curves(x: Any) -> bool:
  return isinstance(x, path_core.PathEval) or (
      isinstance(x, Mapping) and "paths" not in x and bool(_curves_of(x)))


def _ts_of(result: Any, ts: Any, num_t: int) -> np.ndarray:
  """A result's grid: its own (`PathEval.ts`), else `ts`, else `num_t` points in [0, 1]."""
  if isinstance(result, path_core.PathEval):
    return np.asarray(result.ts, np.float64)
  return np.asarray(ts, np.float64) if ts is not None else np.linspace(0.0, 1.0, num_t)


def _verdict(entry: Mapping[str, Any]) -> str:
  """An eval_path record's Definition 5 verdict of one path ('' when it has none)."""
  if "mechanistically_connected" not in entry:
    return ""
  return ("mechanistically connected" if entry["mechanistically_connected"]
          else "broken: " + ", ".join(entry.get("broken_views", [])))


_FORMS = ("a PathEval, {name: PathEval}, {path: {view: PathEval}}, or an eval_path record "
          "(curves may also be dicts {'loss': [...], 'accuracy': [...]})")


def path_panels(results: Any) -> tuple[dict[str, dict[str, Any]], dict[str, str], Any]:
  """({panel: {line: curves}}, {panel: verdict}, the record's ts or None) of any form.

  A PathEval is one panel of one line; {name: PathEval} one panel, a line per
  name; {path: {view: PathEval}} and an eval_path record (`{'ts', 'paths':
  {path: {'views': {view: curves}, verdict...}}}`) a panel per path, a line per view.
  """
  record_ts = None
  if isinstance(results, Mapping) and isinstance(results.get("paths"), Mapping):
    record_ts, results = results.get("ts"), results["paths"]
  if _is_curves(results):
    return {"": {"": results}}, {}, record_ts
  if not isinstance(results, Mapping) or not results:
    raise TypeError(f"Cannot plot {type(results).__name__}: give {_FORMS}.")
  if all(_is_curves(v) for v in results.values()):
    return {"": dict(results)}, {}, record_ts
  panels, verdicts = {}, {}
  for name, entry in results.items():
    lines = entry.get("views", entry) if isinstance(entry, Mapping) else None
    if not isinstance(lines, Mapping) or not lines or not all(map(_is_curves, lines.values())):
      raise TypeError(f"Cannot plot the entry {name!r} ({type(entry).__name__}): give {_FORMS}.")
    panels[name], verdicts[name] = dict(lines), _verdict(entry)
  return panels, verdicts, record_ts


def _metrics_of(panels: dict[str, dict[str, Any]]) -> list[str]:
  """The metrics every curve has, in the first curve's order."""
  all_curves = [_curves_of(c) for lines in panels.values() for c in lines.values()]
  common = [m for m in all_curves[0] if all(m in c for c in all_curves)]
  if not common:
    raise ValueError(f"These curves share no metric: {[sorted(c) for c in all_curves]}.")
  return common


def _draw_lines(ax: Any, lines: dict[str, Any], metric: str, ts: Any) -> None:
  for label, result in lines.items():
    values = _curves_of(result)[metric]
    colour, style = VIEW_STYLES.get(label, (None, "-"))
    ax.plot(_ts_of(result, ts, len(values)), values, style, color=colour, marker=".",
            label=label or None)
  ax.grid(alpha=0.3)
  if metric == "accuracy":
    ax.set_ylim(0.0, 1.02)


def plot_path(results: Any, path: str | None = None, *, metrics: str | Sequence[str] | None = None,
              ts: Sequence[float] | None = None, title: str | None = None,
              xlabel: str = T_LABEL) -> Any:
  """Metrics along t: a row of panels per metric, a column per path, a line per view.

  Args:
    results: a `barriers.PathEval`, {name: PathEval} (e.g. the views of
      `barriers.evaluate_path_on_sets`: one panel), {path name: {view:
      PathEval}} (a column per path), or an eval_path record (titles carry its
      Definition 5 verdicts). Curves may be record dicts ({'loss': [...],
      'accuracy': [...]}) in place of PathEvals.
    path: where to write the PNG (None: not saved).
    metrics: the rows (default: every metric the curves share, e.g. loss and
      accuracy).
    ts: the grid of curves given as lists (default: the record's, else
      `linspace(0, 1, K)`); a PathEval's own `ts` is always used.
    title: above the figure.
    xlabel: below each column.

  Returns:
    The figure: `len(metrics)` x `len(paths)` axes.
  """
  panels, verdicts, record_ts = path_panels(results)
  ts = record_ts if ts is None else ts
  metrics = [metrics] if isinstance(metrics, str) else list(metrics or _metrics_of(panels))
  fig = _figure(figsize=(3.6 * len(panels) + 0.6, 2.6 * len(metrics) + 0.6))
  axes = fig.subplots(len(metrics), len(panels), squeeze=False, sharex=True, sharey="row")
  for col, (name, lines) in enumerate(panels.items()):
    for row, metric in enumerate(metrics):
      _draw_lines(axes[row, col], lines, metric, ts)
    heading = "\n".join(s for s in (name, verdicts.get(name, "")) if s)
    if heading:
      axes[0, col].set_title(heading, fontsize=9)
    axes[-1, col].set_xlabel(xlabel)
  for row, metric in enumerate(metrics):
    axes[row, 0].set_ylabel(metric)
  if any(label for lines in panels.values() for label in lines):
    axes[0, -1].legend(fontsize=8, loc="best")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _saved(fig, path, 110)


def plot_path_views(record: Any, path: str | None = None, *,
                    metrics: str | Sequence[str] | None = None) -> Any:
  """eval_path's figure, in the style of the paper's Figure 4: loss and accuracy along t.

  A column of panels per path (e.g. 'linear', 'linear (aligned)', a fitted
  curve), a row per metric, a line per view; titles carry the Definition 5
  verdict. `record`: an eval_path record ({'ts': [...], 'paths': {name:
  {'views': {view: {'loss': [...], 'accuracy': [...]}}, 'mechanistically_connected',
  'broken_views'}}}) or any form `plot_path` takes. Returns the figure.
  """
  return plot_path(record, path, metrics=metrics)


def plot_finetune_views(record: dict, path: str | None = None) -> Any:
  """Grouped bars: accuracy per view (mean, std over seeds) of the cue model and each method.

  `record`: a reproduce record. Returns the figure.
  """
  views = list(record["cue_model"]["views"])
  rows = {"cue model": {v: (record["cue_model"]["views"][v]["accuracy"], 0.0) for v in views}}
  for method, row in record["methods"].items():
    rows[method] = {v: (row["views"][v]["mean"], row["views"][v]["std"]) for v in views}
  fig = _figure(figsize=(1.3 * len(rows) + 2, 3.2))
  ax = fig.subplots()
  width = 0.8 / len(views)
  for i, view in enumerate(views):
    colour = VIEW_STYLES.get(view, (None, "-"))[0]
    xs = np.arange(len(rows)) + (i - (len(views) - 1) / 2) * width
    ax.bar(xs, [r[view][0] for r in rows.values()], width, yerr=[r[view][1] for r in rows.values()],
           color=colour, label=view, capsize=2)
  ax.set_xticks(np.arange(len(rows)), list(rows))
  ax.set_ylabel("test accuracy")
  ax.set_ylim(0, 1.02)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8, ncol=len(views), loc="upper center", bbox_to_anchor=(0.5, 1.18))
  fig.tight_layout()
  return _saved(fig, path, 110)


def seed_curves(results: Mapping[str, Any], metric: str = "loss",
                ts: Sequence[float] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(ts [K], {method: [seeds, K] values of `metric`}) of the study's paths in any form.

  `results`: {method: [curves of each seed]} or {method: curves} (curves: a
  PathEval or a record's {'loss': [...], ...}), or a reproduce record, whose
  table holds the mean over seeds only ('path_loss_mean': one row per method).
  """
  if isinstance(results.get("methods"), Mapping):  # a reproduce record
    ts = results.get("ts") if ts is None else ts
    results = {m: {metric: row[f"path_{metric}_mean"]} for m, row in results["methods"].items()}
  curves, grid = {}, None
  for method, seeds in results.items():
    seeds = [seeds] if _is_curves(seeds) else list(seeds)
    if not seeds or not all(map(_is_curves, seeds)):
      raise TypeError(f"{method!r}: give a PathEval, curves, or a list of them (one per seed).")
    curves[method] = np.stack([_curves_of(s)[metric] for s in seeds])
    grid = _ts_of(seeds[0], ts, curves[method].shape[1]) if grid is None else grid
  return grid, curves


def plot_finetune_paths(results: Mapping[str, Any], path: str | None = None, *,
                        metric: str = "loss", ts: Sequence[float] | None = None) -> Any:
  """The study's paths: `metric` on cue data along the linear path from the cue model (t = 0)
  to each fine-tuned model: the mean over seeds, a +-1 std band and every seed (thin).

  Args:
    results: {method: [PathEval or curves of each seed]}, or a reproduce
      record (means only: no band). See `seed_curves`.
    path: where to write the PNG (None: not saved).
    metric: 'loss' or 'accuracy'.
    ts: the grid of curves given as lists (default: the record's, or linspace).

  Returns:
    The figure (one axes: per method a mean line, and with several seeds a band
    and a thin line per seed).
  """
  grid, curves = seed_curves(results, metric, ts)
  fig = _figure(figsize=(5.2, 3.6))
  ax = fig.subplots()
  for i, (method, values) in enumerate(curves.items()):
    colour, mean = f"C{i % 10}", values.mean(axis=0)
    label = method if len(values) == 1 else f"{method} ({len(values)} seeds)"
    ax.plot(grid, mean, color=colour, marker=".", label=label)
    if len(values) > 1:
      std = values.std(axis=0)
      ax.fill_between(grid, mean - std, mean + std, color=colour, alpha=0.18, linewidth=0)
      for seed_values in values:
        ax.plot(grid, seed_values, color=colour, alpha=0.45, linewidth=0.7)
  ax.set_xlabel("t  (0: cue model, 1: fine-tuned model)")
  spread = any(len(v) > 1 for v in curves.values())
  ax.set_ylabel(f"{metric} on the cue view" + ("\n(mean +- std over seeds)" if spread else ""))
  if metric == "accuracy":
    ax.set_ylim(0.0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _saved(fig, path, 110)
