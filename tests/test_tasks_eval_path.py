"""mechconn.tasks.eval_path and fit_curve end to end on tiny runs: train two end points, fit a
curve, evaluate every path on the views; the end points' checks."""

import json
import os

import jax
import numpy as np
import pytest

from experiments.configs import eval_path as eval_path_config
from experiments.configs import fit_curve as fit_curve_config
from experiments.configs import train as train_config
from mechconn import barriers
from mechconn import tasks
from mechconn.tasks import alignment
from mechconn.tasks import eval_path as eval_path_task
from mechconn.tasks import path_diagnostics
from mechconn.tasks import runs as runs_lib


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("connectivity")
  workdirs = {}
  for name, preset in (("cue", "cpu_cue"), ("nocue", "cpu_nocue")):
    workdirs[name] = str(root / name)
    tasks.run(train_config.get_config(f"{preset},quicktest"), workdirs[name])
  config = fit_curve_config.get_config("cpu_clean,quicktest")
  config.start_workdir, config.end_workdir = workdirs["cue"], workdirs["nocue"]
  config.num_epochs = 1
  workdirs["curve"] = str(root / "curve")
  tasks.run(config, workdirs["curve"])
  config = eval_path_config.get_config("cpu,quicktest")
  config.start_workdir, config.end_workdir = workdirs["cue"], workdirs["nocue"]
  config.curve_workdirs = (workdirs["curve"],)
  workdirs["eval"] = str(root / "eval")
  record = tasks.run(config, workdirs["eval"])
  return workdirs, config, record


@pytest.mark.slow
def test_eval_path_record_is_complete_and_consistent(runs):
  workdirs, config, record = runs
  with open(os.path.join(workdirs["eval"], eval_path_task.EVAL_PATH_FILE)) as f:
    assert json.load(f) == json.loads(json.dumps(record))
  figure = os.path.join(workdirs["eval"], eval_path_task.EVAL_PATH_FIGURE)
  assert os.path.getsize(figure) > 10_000
  names = list(record["paths"])
  assert names == ["linear", "linear (aligned)", "bezier (fit on clean data)"]
  ts = np.asarray(record["ts"])
  np.testing.assert_allclose(ts, np.linspace(0, 1, config.path.num_t))
  for p in record["paths"].values():
    assert set(p["views"]) == {"clean", "cue", "rand_cue", "rand_img"}
    for view, curve in p["views"].items():
      expected = barriers.barrier_height(ts, 1 - np.asarray(curve["accuracy"]))
      assert set(p["barriers"][view]) == {"loss", "loss_t", "error", "error_t"}
      assert p["barriers"][view]["error"] == pytest.approx(float(expected), abs=1e-6)
      expected = barriers.barrier_height(ts, np.asarray(curve["loss"]))
      assert p["barriers"][view]["loss"] == pytest.approx(float(expected), rel=1e-5, abs=1e-5)
    broken = [v for v, b in p["barriers"].items() if b["error"] > config.barrier_tolerance]
    assert sorted(p["broken_views"]) == sorted(broken)
    assert p["mechanistically_connected"] == (not broken)
  # Every path joins the same two end points: equal values at t = 0 and t = 1.
  for view in ("clean", "rand_img"):
    ends = [(p["views"][view]["accuracy"][0], p["views"][view]["accuracy"][-1])
            for p in record["paths"].values()]
    np.testing.assert_allclose(ends, [ends[0]] * len(ends), atol=1e-6)
  # Provenance.
  assert record["start"]["checkpoint"].startswith(workdirs["cue"])
  assert record["batchnorm"] == {"recomputed_at_every_t_from": "clean", "dataset": "shapes10",
                                 "num_examples": 64}
  assert record["curves"][0]["fit_data"]["cue_proportion"] == 0.0
  assert record["alignment"]["method"] == "weight"


@pytest.mark.slow
def test_tensorboard_holds_the_eval_path_curves_and_each_loop_s_metrics(runs):
  from test_metric_writers import event_files, jsonl_scalars, tensorboard_view  # pylint: disable=g-import-not-at-top
  workdirs, config, record = runs
  files = event_files(workdirs["eval"])
  assert [os.path.basename(f) for f in files] == [eval_path_task.EVAL_PATH_EVENTS]
  steps = [round(1000 * t) for t in record["ts"]]  # the documented step of each t
  expected = {(f"{name}/{view}/{metric}", step): float(np.float32(value))
              for name, entry in record["paths"].items()
              for view, curves in entry["views"].items()
              for metric, values in curves.items() for step, value in zip(steps, values)}
  assert len(expected) == 3 * 4 * 2 * config.path.num_t  # paths x views x metrics x t
  assert tensorboard_view(workdirs["eval"]) == expected
  for name in ("cue", "nocue", "curve"):  # train and fit_curve: through loop.train_loop
    scalars = jsonl_scalars(workdirs[name])
    assert ("train/loss", max(s for _, s in scalars)) in scalars
    assert tensorboard_view(workdirs[name]) == scalars


@pytest.mark.slow
def test_curve_of_other_end_points_is_refused(runs, tmp_path):
  workdirs, config, _ = runs
  config.start_workdir, config.end_workdir = workdirs["nocue"], workdirs["cue"]  # swapped
  with pytest.raises(ValueError, match="was fitted between"):
    tasks.run(config, str(tmp_path / "other"))


def test_unfinished_end_point_is_refused(tmp_path):
  config = fit_curve_config.get_config("cpu_clean,quicktest")
  config.start_workdir = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="no finished train run"):
    tasks.run(config, str(tmp_path / "curve"))


def test_unfinished_or_checkpointless_finetune_runs_are_refused(tmp_path):
  run = tmp_path / "ft"
  run.mkdir()
  (run / "config.json").write_text(json.dumps({"task": "finetune", "method": "dfr"}))
  with pytest.raises(FileNotFoundError, match="no finished finetune run"):
    runs_lib.load_model_run(str(run))
  (run / runs_lib.FINETUNE_RESULT_FILE).write_text("{}")
  with pytest.raises(ValueError, match="'dfr', which keeps no checkpoint"):
    runs_lib.load_model_run(str(run))
  from mechconn.tasks import finetune as finetune_task  # pylint: disable=g-import-not-at-top
  assert runs_lib.FINETUNE_RESULT_FILE == finetune_task.RESULT_FILE


def test_end_points_must_match_the_path_config_data():
  import dataclasses
  from types import SimpleNamespace
  from experiments.configs import train as train_configs
  from mechconn.tasks import runs as runs_lib
  from mechconn.tasks import specs

  def run(**data):
    return SimpleNamespace(config={"model": {"name": "small_cnn", "kwargs": {"width": 4},
                                             "dtype": "float32"},
                                   "data": {"dataset": "shapes10", "cue": "box",
                                            "simple_dataset": "glyphs10", **data}},
                           checkpoint="ckpt")

  box = specs.data_spec(train_configs.get_config("cpu_cue").data, "train")
  runs_lib.check_endpoints(run(), run(cue="none"), box)  # 'none' is evaluated on box views
  with pytest.raises(ValueError, match=r"trained with data.cue='dominoes' but this config has "
                                       r"config.data.cue='box'"):
    runs_lib.check_endpoints(run(), run(cue="dominoes"), box)
  dominoes = dataclasses.replace(box, cue="dominoes")
  with pytest.raises(ValueError, match=r"data.simple_dataset='mnist'"):
    runs_lib.check_endpoints(run(cue="dominoes"),
                             run(cue="dominoes", simple_dataset="mnist"), dominoes)


@pytest.mark.slow
@pytest.mark.parametrize("sites", ["post_relu", "module_outputs"])
def test_activation_alignment_correlates_the_configured_sites(runs, tmp_path, monkeypatch, sites):
  """activation_sites reaches the matching (post_relu: the ReLU of every site) and the record."""
  workdirs, _, _ = runs
  seen = []
  original = alignment.matching.activation_matching

  def spy(*args, post=None, **kwargs):
    seen.append(post)
    return original(*args, post=post, **kwargs)

  monkeypatch.setattr(alignment.matching, "activation_matching", spy)
  config = eval_path_config.get_config("cpu,quicktest")
  config.start_workdir, config.end_workdir = workdirs["cue"], workdirs["nocue"]
  config.curve_workdirs, config.align, config.activation_sites = (), "activation", sites
  record = tasks.run(config, str(tmp_path / "eval"))
  assert seen == [jax.nn.relu if sites == "post_relu" else None]
  assert record["alignment"]["method"] == "activation"
  assert record["alignment"]["activation_sites"] == sites
  assert list(record["paths"]) == ["linear", "linear (aligned)"]


@pytest.mark.slow
def test_a_curve_of_an_end_point_retrained_in_place_is_refused(runs, tmp_path):
  workdirs, _, _ = runs
  cue = str(tmp_path / "cue")
  tasks.run(train_config.get_config("cpu_cue,quicktest"), cue)
  fit = fit_curve_config.get_config("cpu_clean,quicktest")
  fit.start_workdir, fit.end_workdir, fit.num_epochs = cue, workdirs["nocue"], 1
  tasks.run(fit, str(tmp_path / "curve"))
  retrained = train_config.get_config("cpu_cue,quicktest")
  retrained.seed = 5  # same path, same final step, another model
  tasks.run(retrained, cue, overwrite=True)
  config = eval_path_config.get_config("cpu,quicktest")
  config.start_workdir, config.end_workdir = cue, workdirs["nocue"]
  config.curve_workdirs = (str(tmp_path / "curve"),)
  with pytest.raises(ValueError, match=r"fitted between other end points .*differ in "
                                       r"\['start.config.seed'\].*Refit"):
    tasks.run(config, str(tmp_path / "eval"))
  # The fit itself, relaunched, is refused too (it would resume against the new end point).
  with pytest.raises(FileExistsError, match=r"differs in \['inputs.start.config.seed'\]"):
    tasks.run(fit, str(tmp_path / "curve"))


@pytest.mark.slow
def test_the_same_run_at_both_ends_is_refused_before_the_claim(runs, tmp_path):
  workdirs, config, _ = runs
  config = eval_path_config.get_config("cpu,quicktest")
  config.start_workdir = config.end_workdir = workdirs["cue"]
  config.curve_workdirs = ()
  with pytest.raises(ValueError, match=r"end points are the same run .*allow_identical"):
    tasks.run(config, str(tmp_path / "same"))
  assert not (tmp_path / "same").exists()
  config.allow_identical_endpoints = True  # asked for: a flat path, evaluated
  record = tasks.run(config, str(tmp_path / "same"))
  assert record["paths"]["linear"]["mechanistically_connected"]


@pytest.mark.slow
def test_diagnostics_run_on_every_path_and_agree_with_the_paths(runs, tmp_path):
  workdirs, _, _ = runs
  config = eval_path_config.get_config("cpu,quicktest,diagnose")
  config.start_workdir, config.end_workdir = workdirs["cue"], workdirs["nocue"]
  config.curve_workdirs = ()
  record = tasks.run(config, str(tmp_path / "diagnose"))
  names = list(record["paths"])
  assert list(record["diagnostics"]) == names == ["linear", "linear (aligned)"]
  for name, d in record["diagnostics"].items():
    assert set(d["seconds"]) == {*path_diagnostics.DIAGNOSTICS, "adaptive"}
    lw = d["layerwise"]
    assert set(lw["groups"]) == {"P_0", "P_1", "P_2", "unpermuted"}  # the spec's groups
    for view, rows in lw["excess_loss"].items():
      np.testing.assert_allclose(np.asarray(rows)[:, [0, -1]], 0.0, atol=1e-5)  # on its chord
    for site, curves in d["features"]["views"]["clean"].items():
      assert curves["cosine"][0] == pytest.approx(1.0, abs=1e-5)
      assert curves["agreement_a"][0] == pytest.approx(1.0)
    assert np.all(np.isfinite(d["curvature"]["top_eigenvalues"]))
    # The calibration record's barriers are those of its own curves.
    ts = np.asarray(d["ts"])
    for view, curves in d["calibration"]["views"].items():
      summary = d["calibration"]["summary"][view]
      assert summary["loss"] == pytest.approx(
          float(barriers.barrier_height(ts, np.asarray(curves["loss"]))), abs=1e-5)
      assert summary["calibrated_loss"] == pytest.approx(
          float(barriers.barrier_height(ts, np.asarray(curves["calibrated_loss"]))), abs=1e-5)
    assert all(0.05 <= t <= 20.0 for t in d["calibration"]["temperature"])
    for view, by_metric in d["adaptive"].items():
      for metric, found in by_metric.items():
        grid = record["paths"][name]["barriers"][view][metric]
        assert found["grid"]["value"] == grid
        if found["certified"]:  # the grid's maximum is a value of the curve: within tol
          assert grid <= found["value"] + config.diagnostics.adaptive_tolerance + 1e-6
  for figure in path_diagnostics.FIGURES.values():
    assert (tmp_path / "diagnose" / figure).stat().st_size > 5_000


@pytest.mark.slow
def test_a_finetune_run_is_an_end_point(runs, tmp_path):
  from experiments.configs import finetune as finetune_config  # pylint: disable=g-import-not-at-top
  workdirs, _, _ = runs
  config = finetune_config.get_config("naive,quicktest")
  config.cue_model_workdir = workdirs["cue"]
  tasks.run(config, str(tmp_path / "naive"))
  eval_config = eval_path_config.get_config("cpu,quicktest")
  eval_config.start_workdir, eval_config.end_workdir = workdirs["cue"], str(tmp_path / "naive")
  eval_config.curve_workdirs, eval_config.align = (), "none"
  record = tasks.run(eval_config, str(tmp_path / "eval"))
  assert record["end"]["checkpoint"].startswith(str(tmp_path / "naive"))
  finetuned = runs_lib.load_model_run(str(tmp_path / "naive"))
  assert finetuned.config["finetuned"]["method"] == "naive"
  start = runs_lib.load_model_run(workdirs["cue"])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                       start.params, finetuned.params))
  assert max(moved) > 0  # the fine-tuned weights, not the cue model's
  # t = 1 is the fine-tuned model (BatchNorm recomputed), not the cue model at t = 0.
  clean = record["paths"]["linear"]["views"]["clean"]["loss"]
  assert abs(clean[-1] - clean[0]) > 1e-6  # quicktest models sit near chance: small but real
