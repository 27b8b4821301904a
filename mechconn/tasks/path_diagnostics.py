"""eval_path's diagnostics: where and why each path's barrier forms (`mechconn.diagnostics`).

With `config.diagnostics.run` naming any of 'layerwise', 'features',
'curvature' and 'calibration' (and `diagnostics.adaptive`), eval_path runs
them on every path it evaluates, on the first `num_examples` test examples of
each view, and adds to `eval_path.json` a 'diagnostics' entry per path:

  - layerwise: per view, group and (mode, anchor) the barriers, and the
    heatmap's cells (loss above the chord, only one group moving, the rest at
    the cue model);
  - features: per view and site the LLFC cosine and the activation-pattern
    agreement with each end point at every t;
  - curvature: the top Hessian eigenvalue(s) and trace of the clean loss at
    every t;
  - calibration: the temperature at every t, fitted on held-out clean
    examples, and each view's raw and calibrated loss and barriers;
  - adaptive: each view's loss and error barrier maxima found adaptively,
    with their evaluations, beside the grid's.

Figures beside it: `eval_path_<diagnostic>.png` (`mechconn.diagnostics.plots`).
Image models only (a language model's diagnostics: the library, from Python).
"""

import dataclasses
import functools
import time

import ml_collections
import numpy as np

from mechconn import config_checks as checks
from mechconn.data import batching
from mechconn.data import datasets
from mechconn.diagnostics import adaptive
from mechconn.diagnostics import calibration
from mechconn.diagnostics import curvature
from mechconn.diagnostics import features
from mechconn.diagnostics import layerwise
from mechconn.diagnostics import plots
from mechconn.diagnostics import records
from mechconn.tasks import data as task_data
from mechconn.tasks import specs

DIAGNOSTICS = ("layerwise", "features", "curvature", "calibration")
GROUPINGS = ("spec", "modules")
FIGURES = {name: f"eval_path_{name}.png" for name in DIAGNOSTICS}
# A fresh draw of an embedded test split for calibration: its seed is the data's plus this.
CALIBRATION_SEED_OFFSET = 1000


@dataclasses.dataclass(frozen=True)
class DiagnosticsSpec:
  """A checked `diagnostics` section (see experiments/configs/common.py)."""

  run: tuple[str, ...]
  groups: str
  num_t: int
  num_examples: int
  curvature_examples: int
  num_eigenvalues: int
  num_matvecs: int
  num_probes: int
  calibration_examples: int
  adaptive: bool
  adaptive_tolerance: float

  @property
  def enabled(self) -> bool:
    return bool(self.run) or self.adaptive


NONE = DiagnosticsSpec(run=(), groups="spec", num_t=2, num_examples=0, curvature_examples=0,
                       num_eigenvalues=0, num_matvecs=0, num_probes=0, calibration_examples=0,
                       adaptive=False, adaptive_tolerance=0.0)


def resolve(section: ml_collections.ConfigDict | None, data: specs.DataSpec) -> DiagnosticsSpec:
  """The `diagnostics` section, checked (ValueError naming the key); None: no diagnostics."""
  if section is None:
    return NONE
  run = (section.run,) if isinstance(section.run, str) else tuple(section.run)
  run = tuple(r for r in run if r)
  for name in run:
    checks.check_choice(name, DIAGNOSTICS, "diagnostics.run[]")
  if len(set(run)) != len(run):
    raise ValueError(f"config.diagnostics.run={list(run)} names a diagnostic twice.")
  if (run or section.adaptive) and data.is_sequence:
    raise ValueError("config.diagnostics: eval_path runs the diagnostics on image models; for "
                     "a language model call mechconn.diagnostics from Python.")
  checks.check_choice(section.groups, GROUPINGS, "diagnostics.groups")
  checks.check_int(section.num_t, "diagnostics.num_t", minimum=2)
  for key in ("num_examples", "curvature_examples", "num_eigenvalues", "num_matvecs",
              "calibration_examples"):
    checks.check_positive_int(section[key], f"diagnostics.{key}")
  checks.check_int(section.num_probes, "diagnostics.num_probes", minimum=0)
  if section.num_eigenvalues > section.num_matvecs:
    raise ValueError(f"config.diagnostics.num_eigenvalues={section.num_eigenvalues} exceeds "
                     f"diagnostics.num_matvecs={section.num_matvecs} (Lanczos finds at most "
                     "one eigenvalue per step).")
  checks.check_choice(section.adaptive, (True, False), "diagnostics.adaptive")
  checks.check_number(section.adaptive_tolerance, "diagnostics.adaptive_tolerance", low=0.0)
  if section.adaptive_tolerance <= 0:
    raise ValueError("config.diagnostics.adaptive_tolerance must be > 0.")
  return DiagnosticsSpec(
      run=run, groups=section.groups, num_t=section.num_t, num_examples=section.num_examples,
      curvature_examples=section.curvature_examples, num_eigenvalues=section.num_eigenvalues,
      num_matvecs=section.num_matvecs, num_probes=section.num_probes,
      calibration_examples=section.calibration_examples, adaptive=section.adaptive,
      adaptive_tolerance=float(section.adaptive_tolerance))


def first_examples(view_batches: dict, num_examples: int) -> dict:
  """Each view's first `num_examples` (whole batches; the padding mask kept)."""
  batch = next(iter(view_batches.values()))["mask"].shape[1]
  keep = -(-num_examples // batch)
  out = {}
  for view, batches in view_batches.items():
    mask = np.asarray(batches["mask"][:keep]).copy()
    mask.reshape(-1)[num_examples:] = 0  # rows beyond the first num_examples stop counting
    out[view] = {**{k: v[:keep] for k, v in batches.items() if k != "mask"}, "mask": mask}
  return out


def calibration_batches(data: specs.ImageData, num_examples: int, batch_size: int) -> dict:
  """Held-out clean test examples, stacked: never the eval set.

  Embedded data: a fresh draw of the test split (seed data.seed +
  CALIBRATION_SEED_OFFSET), the same distribution as the eval set and
  independent of it and of training. TFDS: the test examples after the first
  data.num_test (the evaluated ones).
  """
  if data.dataset in datasets.EMBEDDED:
    held_out = dataclasses.replace(data, seed=data.seed + CALIBRATION_SEED_OFFSET,
                                   num_test=num_examples)
    views, labels = task_data.load_test_views(held_out)
  else:
    if data.num_test < 0:
      raise ValueError("config.diagnostics: calibration needs held-out test examples after "
                       "the evaluated ones; set data.num_test (not -1) below the split's size.")
    views, labels = task_data.load_test_views(
        dataclasses.replace(data, num_test=data.num_test + num_examples))
    views, labels = {"clean": views["clean"][data.num_test:]}, labels[data.num_test:]
  if len(labels) < num_examples:
    raise ValueError(f"config.diagnostics.calibration_examples={num_examples}: only "
                     f"{len(labels)} held-out test examples remain after data.num_test.")
  return batching.stack_batches(views["clean"], labels, batch_size)


@dataclasses.dataclass(frozen=True)
class PathData:
  """What the diagnostics of one eval_path run read, shared by its paths."""

  apply_fn: object
  all_views: dict  # {view: stacked batches}: the paths' eval sets (the adaptive maximum's)
  views: dict  # {view: stacked batches}: each view's first num_examples
  bn_batches: dict
  curvature_batches: dict | None
  calibration_batches: dict | None
  renormalize: str | None
  groups: object  # diagnostics.groups.Groups


def path_data(spec: DiagnosticsSpec, apply_fn, view_batches: dict, bn_batches: dict, *,
              data: specs.ImageData, renormalize, perm_spec, batch_size: int) -> PathData:
  """The diagnostics' data: each view's first examples, the curvature's and calibration's."""
  views = first_examples(view_batches, spec.num_examples)
  curvature_batches = (first_examples({"clean": view_batches["clean"]},
                                      spec.curvature_examples)["clean"]
                       if "curvature" in spec.run else None)
  calibration = (calibration_batches(data, spec.calibration_examples, batch_size)
                 if "calibration" in spec.run else None)
  return PathData(apply_fn=apply_fn, all_views=view_batches, views=views, bn_batches=bn_batches,
                  curvature_batches=curvature_batches, calibration_batches=calibration,
                  renormalize=renormalize, groups=perm_spec if spec.groups == "spec" else None)


def _layerwise(spec, d: PathData, kind, points, ts) -> dict:
  return records.layerwise_record(layerwise.layerwise_barriers(
      d.apply_fn, points, ts, d.views, d.bn_batches, groups=d.groups, path=kind,
      renormalize=d.renormalize))


def _features(spec, d: PathData, kind, points, ts) -> dict:
  return records.features_record(features.feature_connectivity(
      d.apply_fn, points, ts, d.views, d.bn_batches, path=kind, renormalize=d.renormalize))


def _curvature(spec, d: PathData, kind, points, ts) -> dict:
  c = curvature.path_curvature(d.apply_fn, points, ts, d.curvature_batches, d.bn_batches,
                               path=kind, renormalize=d.renormalize,
                               num_eigenvalues=spec.num_eigenvalues,
                               num_matvecs=spec.num_matvecs, num_probes=spec.num_probes)
  return {**records.curvature_record(c), "examples": spec.curvature_examples, "view": "clean"}


def _calibration(spec, d: PathData, kind, points, ts) -> dict:
  cp = calibration.calibrated_path(d.apply_fn, points, ts, d.views, d.calibration_batches,
                                   d.bn_batches, path=kind, renormalize=d.renormalize)
  return {**records.calibration_record(cp), "examples": spec.calibration_examples}


def _adaptive(spec, d: PathData, kind, points, grid: dict) -> dict:
  out = {}
  for view, batches in d.all_views.items():  # the grid's own eval sets
    out[view] = {}
    for metric in ("loss", "error"):
      found = adaptive.adaptive_barrier(d.apply_fn, points, batches, d.bn_batches,
                                        metric=metric, path=kind, renormalize=d.renormalize,
                                        tol=spec.adaptive_tolerance)
      out[view][metric] = {**found.summary(), "grid": grid[view][metric]}
  return out


RUNNERS = {"layerwise": _layerwise, "features": _features, "curvature": _curvature,
           "calibration": _calibration}


def run(spec: DiagnosticsSpec, d: PathData, paths: dict) -> dict:
  """{path name: its diagnostics record} (`paths`: {name: (kind, points, grid barriers)})."""
  ts = np.linspace(0.0, 1.0, spec.num_t)
  out = {}
  for name, (kind, points, grid) in paths.items():
    record = {"ts": ts.tolist(), "seconds": {}}
    for diagnostic in spec.run:
      start = time.perf_counter()
      record[diagnostic] = RUNNERS[diagnostic](spec, d, kind, points, ts)
      record["seconds"][diagnostic] = round(time.perf_counter() - start, 2)
    if spec.adaptive:
      start = time.perf_counter()
      record["adaptive"] = _adaptive(spec, d, kind, points, grid)
      record["seconds"]["adaptive"] = round(time.perf_counter() - start, 2)
    out[name] = record
  return out


def figures(records: dict) -> dict:
  """{file name: writer} of the figures of the diagnostics that ran."""
  ran = {k for record in records.values() for k in DIAGNOSTICS if record.get(k)}
  return {FIGURES[k]: functools.partial(plots.PLOTS[k], records) for k in DIAGNOSTICS
          if k in ran}


def format_table(records: dict) -> str:
  """One line per path and diagnostic: what it found (printed after the barrier table)."""
  lines = []
  for name, record in records.items():
    if "layerwise" in record:
      clean = record["layerwise"]["barriers"].get("clean") or next(
          iter(record["layerwise"]["barriers"].values()))
      only = {g: b["only@a"]["loss"] for g, b in clean.items()}
      top = max(only, key=only.get)
      lines.append(f"{name}: layer-wise (clean, only one group moving from the start model): "
                   f"largest loss barrier {only[top]:.3f} in {top}")
    if "features" in record:
      per_site = record["features"]["views"].get("clean") or {}
      if per_site:
        low = min(per_site, key=lambda s: min(per_site[s]["cosine"]))
        lines.append(f"{name}: feature connectivity (clean): lowest LLFC cosine "
                     f"{min(per_site[low]['cosine']):.3f} at {low}")
    if "curvature" in record:
      top = np.asarray(record["curvature"]["top_eigenvalues"])[:, 0]
      lines.append(f"{name}: curvature: top Hessian eigenvalue {top[0]:.3g} -> "
                   f"max {top.max():.3g} -> {top[-1]:.3g}")
    if "calibration" in record:
      s = record["calibration"]["summary"].get("clean", {})
      if s:
        lines.append(f"{name}: calibration (clean): loss barrier {s['loss']:.3f} raw, "
                     f"{s['calibrated_loss']:.3f} calibrated")
    if "adaptive" in record:
      for view, by_metric in record["adaptive"].items():
        a = by_metric["loss"]
        lines.append(f"{name}: adaptive ({view}, loss): {a['value']:.3f} at t={a['t']:.3f} in "
                     f"{a['num_evaluations']} evaluations (grid: {a['grid']['value']:.3f})")
  return "\n".join(lines)
