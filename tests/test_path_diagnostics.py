"""eval_path's diagnostics section: its checks, the data it reads, its figures."""

import dataclasses

import numpy as np
import pytest

from experiments.configs import common
from experiments.configs import eval_path as eval_path_config
from mechconn.data.batching import stack_batches
from mechconn.tasks import path_diagnostics
from mechconn.tasks import specs


def _section(**changes):
  section = common.diagnostics_section()
  section.unlock()
  for key, value in changes.items():
    section[key] = value
  return section


def _data():
  return specs.data_spec(eval_path_config.get_config("cpu").data, "eval_path")


def test_default_runs_nothing_and_diagnose_runs_everything():
  assert not path_diagnostics.resolve(common.diagnostics_section(), _data()).enabled
  assert path_diagnostics.resolve(None, _data()) == path_diagnostics.NONE
  config = eval_path_config.get_config("cpu,diagnose")
  spec = path_diagnostics.resolve(config.diagnostics, _data())
  assert spec.run == path_diagnostics.DIAGNOSTICS and spec.adaptive


@pytest.mark.parametrize("changes, message", [
    ({"run": ("layerwise", "hessian")}, "diagnostics.run"),
    ({"run": ("features", "features")}, "twice"),
    ({"groups": "layers"}, "diagnostics.groups"),
    ({"num_t": 1}, "diagnostics.num_t"),
    ({"num_examples": 0}, "diagnostics.num_examples"),
    ({"num_eigenvalues": 5, "num_matvecs": 4}, "exceeds"),
    ({"num_probes": -1}, "diagnostics.num_probes"),
    ({"adaptive_tolerance": 0.0}, "adaptive_tolerance"),
])
def test_bad_sections_are_refused_naming_the_key(changes, message):
  with pytest.raises(ValueError, match=message):
    path_diagnostics.resolve(_section(**changes), _data())


def test_language_models_are_refused():
  lm = specs.data_spec(eval_path_config.get_config("recall_lm").data, "eval_path")
  with pytest.raises(ValueError, match="language model"):
    path_diagnostics.resolve(_section(run=("layerwise",)), lm)
  with pytest.raises(ValueError, match="image presets"):
    eval_path_config.get_config("recall_lm,diagnose")


def test_first_examples_keeps_whole_batches_and_masks_the_rest():
  x = np.arange(10 * 2 * 2 * 1, dtype=np.float32).reshape(10, 2, 2, 1)
  sets = {"clean": stack_batches(x, np.arange(10) % 3, 4)}  # 3 batches, the last padded
  first = path_diagnostics.first_examples(sets, 5)["clean"]
  assert first["image"].shape[:2] == (2, 4)
  np.testing.assert_array_equal(first["mask"].reshape(-1), [1] * 5 + [0] * 3)
  np.testing.assert_array_equal(first["image"].reshape(-1, 2, 2, 1)[:5], x[:5])
  assert sets["clean"]["mask"].sum() == 10  # the eval set itself is untouched


def test_calibration_examples_are_held_out():
  data = dataclasses.replace(_data(), num_test=300)
  cal = path_diagnostics.calibration_batches(data, 200, 64)
  assert cal["mask"].sum() == 200
  from mechconn.tasks import data as task_data  # pylint: disable=import-outside-toplevel
  views, _ = task_data.load_test_views(data)
  evaluated = {img.tobytes() for img in views["clean"]}
  held_out = [img for img, m in zip(cal["image"].reshape(-1, *cal["image"].shape[2:]),
                                    cal["mask"].reshape(-1)) if m]
  assert not any(img.tobytes() in evaluated for img in held_out)
  assert np.std(np.stack(held_out)) > 0.1  # real images, not padding


def test_figures_only_for_what_ran(tmp_path):
  ts = [0.0, 0.5, 1.0]
  record = {"ts": ts, "curvature": {"top_eigenvalues": [[3.0], [5.0], [2.0]],
                                    "trace": [10.0, 12.0, 9.0], "trace_sem": [1.0, 1.0, 1.0]}}
  writers = path_diagnostics.figures({"linear": record})
  assert list(writers) == [path_diagnostics.FIGURES["curvature"]]
  writers[path_diagnostics.FIGURES["curvature"]](str(tmp_path / "c.png"))
  assert (tmp_path / "c.png").stat().st_size > 5_000
  assert path_diagnostics.figures({"linear": {"ts": ts}}) == {}


def test_plots_draw_every_diagnostic_record(tmp_path):
  from mechconn.diagnostics import plots  # pylint: disable=import-outside-toplevel
  ts = [0.0, 0.5, 1.0]
  record = {
      "ts": ts,
      "layerwise": {"groups": {"P_0": ["Conv_0/kernel"], "head": ["head/kernel"]},
                    "excess_loss": {"clean": [[0.0, 0.3, 0.0], [0.0, -0.1, 0.0]],
                                    "cue": [[0.0, 0.2, 0.0], [0.0, 0.0, 0.0]]}},
      "features": {"views": {"clean": {"Conv_0": {"cosine": [1.0, 1.0, 1.0],
                                                  "agreement_a": [1.0, 0.7, 0.5]}}}},
      "curvature": {"top_eigenvalues": [[3.0], [5.0], [2.0]], "trace": [10.0, 12.0, 9.0],
                    "trace_sem": [1.0, 1.0, 1.0]},
      "calibration": {"temperature": [1.0, 2.0, 1.1],
                      "views": {"clean": {"loss": [0.1, 1.0, 0.2],
                                          "calibrated_loss": [0.1, 0.8, 0.2]}}}}
  for name, plot in plots.PLOTS.items():
    fig = plot({"linear": record, "aligned": record}, str(tmp_path / f"{name}.png"))
    assert len(fig.axes) >= 4  # a row of panels per path
    assert (tmp_path / f"{name}.png").stat().st_size > 5_000
  with pytest.raises(ValueError, match="'curvature'"):
    plots.plot_curvature({"linear": {"ts": ts}})
