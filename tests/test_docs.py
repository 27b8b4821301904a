"""docs/byo_model.md runs as written, and shows what it says it shows."""

import contextlib
import io
import re

import pytest


pytestmark = pytest.mark.slow  # trains two CNNs and two ViTs


def test_bring_your_own_model_tutorial(tmp_path, monkeypatch, repo):
  with open(repo / "docs" / "byo_model.md") as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  assert len(blocks) == 5
  monkeypatch.chdir(tmp_path)  # the figure lands here
  namespace = {"__name__": "__tutorial__"}
  with contextlib.redirect_stdout(io.StringIO()):
    for block in blocks:
      exec(compile(block, "docs/byo_model.md", "exec"), namespace)  # pylint: disable=exec-used
  cnn, plain, vit = (namespace[k] for k in ("cnn_paths", "plain_paths", "vit_paths"))
  barrier = lambda r: r.summary()["loss"]
  # Aligning with the derived specs lowers both pairs' barriers.
  assert barrier(cnn["linear, aligned"]) < barrier(cnn["linear"])
  assert barrier(vit["linear, aligned"]) < barrier(vit["linear"])
  # REPAIR lowers the loss barrier of the aligned pair without BatchNorm (0.561 -> 0.488 when
  # written; its error barrier rose, 0.051 -> 0.085, as the tutorial says).
  assert barrier(plain["linear, aligned, REPAIR"]) < barrier(plain["linear, aligned"])
  assert (tmp_path / "byo_model.png").stat().st_size > 10_000


def _run_tutorial(path, tmp_path, monkeypatch):
  """Every python block of the page at `path`, in order, in one namespace (the figure lands
  in tmp)."""
  with open(path) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "__tutorial__"}
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    for block in blocks:
      exec(compile(block, str(path), "exec"), namespace)  # pylint: disable=exec-used
  return blocks, namespace, out.getvalue()


def test_any_model_tutorial(tmp_path, monkeypatch, repo):
  blocks, ns, printed = _run_tutorial(repo / "docs" / "any_model.md", tmp_path, monkeypatch)
  assert len(blocks) == 7
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  reg, lm = ns["reg_paths"], ns["lm_paths"]
  squared = lambda r: r.summary()["squared_error"]
  # Regression: a real barrier, which weight matching lowers (0.505 -> 0.080 when written).
  assert squared(reg["linear"]) > 0.1 and squared(reg["linear, aligned"]) < squared(reg["linear"])
  np.testing.assert_allclose(np.asarray(reg["linear, aligned"].metrics["squared_error"])[[0, -1]],
                             np.asarray(reg["linear"].metrics["squared_error"])[[0, -1]],
                             rtol=1e-5)
  # The jitted, vmapped core with the user's objective equals one eager call per pair.
  for row, (i, j) in zip(ns["huber_curves"], ns["pairs"]):
    eager = ns["barriers"].evaluate_path(ns["reg_apply"], (ns["reg"][i], ns["reg"][j]), ns["ts"],
                                         ns["reg_test"], objective=ns["huber"])
    np.testing.assert_allclose(row, eager.metrics["huber"], rtol=1e-5)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(ns["huber_grad"]))
  assert "NNX twin equals the Linen curve: True" in printed
  # The LMs learned the task; the path between them breaks it; alignment lowers the barrier
  # (2.08 -> 1.82 weight, 1.79 activation, when written; REPAIR raised it: see the text).
  loss = lambda name: lm[name].summary()["loss"]
  assert float(lm["linear"].accuracy[0]) > 0.95 and float(lm["linear"].accuracy[-1]) > 0.95
  assert loss("linear") > 1.0
  assert loss("linear, activation-aligned") < loss("linear")
  assert loss("linear, weight-aligned") < loss("linear")
  heads = [n for n in ns["lm_spec"].names if n.endswith("query:1")]
  assert len(heads) == 2  # one head group per block
  assert (tmp_path / "any_model.png").stat().st_size > 10_000


def test_diagnostics_tutorial(tmp_path, monkeypatch, repo):
  blocks, ns, printed = _run_tutorial(repo / "docs" / "diagnostics.md", tmp_path, monkeypatch)
  assert len(blocks) == 7
  import numpy as np  # pylint: disable=import-outside-toplevel
  plain, lw, fc = ns["plain"], ns["lw"], ns["fc"]
  loss = lambda r: r.summary()["loss"]
  # Both paths have a loss barrier on both views, and weight matching lowers it (0.19 / 0.20 ->
  # 0.08 / 0.08 when written).
  for view in ("clean", "cue"):
    assert loss(plain["linear"][view]) > 0.1
    assert loss(plain["linear (aligned)"][view]) < loss(plain["linear"][view])
  # Some group carries part of the barrier: freezing it (all but it moving) lowers the barrier.
  cue = lw["linear"].summary()["cue"]
  assert min(b["all_but@a"]["loss"] for b in cue.values()) < loss(plain["linear"]["cue"])
  # The 'only' path of every group, anchored at a, starts at the cue model's loss.
  np.testing.assert_allclose(lw["linear"].path_eval("cue", "P_0").loss[0],
                             plain["linear"]["cue"].loss[0], rtol=1e-5)
  # The first conv is linear in its weights: LLFC holds there exactly; alignment brings the
  # path's features closer to the end points' at every BatchNorm.
  bn = ("BatchNorm_0", "BatchNorm_1", "BatchNorm_2")
  linear, aligned = (fc[k].summary()["clean"] for k in ("linear", "linear (aligned)"))
  assert linear["Conv_0"]["cosine_min"] > 0.999
  assert all(aligned[s]["cosine_min"] > linear[s]["cosine_min"] for s in bn)
  for c in ns["curv"].values():
    assert np.all(np.isfinite(c.top_eigenvalues)) and float(c.top_eigenvalues.min()) > 0
  for c in ns["cal"].values():  # a temperature never changes a prediction
    np.testing.assert_array_equal(c.calibrated["clean"].accuracy, c.raw["clean"].accuracy)
  for grid, found in ns["maxima"].values():
    assert found.certified and found.num_evaluations <= 25
    assert abs(found.value - grid) <= 0.0101
  for name in ("layerwise", "features", "curvature", "calibration"):
    assert (tmp_path / f"diagnostics_{name}.png").stat().st_size > 10_000
  assert "linear (aligned): clean loss barrier" in printed


def test_many_models_tutorial(tmp_path, monkeypatch, repo):
  blocks, ns, printed = _run_tutorial(repo / "docs" / "many_models.md", tmp_path, monkeypatch)
  assert len(blocks) == 5
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mechconn import batchnorm, evaluation  # pylint: disable=import-outside-toplevel
  multi_align, simplex = ns["multi_align"], ns["simplex"]
  # The models learned (0.81-0.88 when written); pair by pair is not cycle-consistent
  # (0.82), both methods are, exactly.
  clean = ns["view_sets"]["clean"]
  for m in ns["models"]:
    assert float(evaluation.mean_metrics(ns["model"].apply, m, clean)["accuracy"]) > 0.6
  assert multi_align.cycle_error(ns["pairwise"], 4) > 0.1
  for result in ns["alignments"].values():
    assert multi_align.cycle_error(result.pairwise(), 4) == 0.0
  # Aligned merges beat plain averaging (0.10 vs 0.33-0.60 when written).
  merged = {name: r["clean"].at("centroid")["accuracy"] for name, r in ns["evals"].items()}
  plain = merged.pop("none (plain averaging)")
  assert plain < 0.2 and max(merged.values()) > plain + 0.2
  # A vertex is its model, evaluated alone with BatchNorm recomputed.
  params = ns["models"][2]["params"]
  alone = evaluation.mean_metrics(ns["model"].apply, {"params": params, "batch_stats":
                                  batchnorm.recompute_batch_stats(ns["model"].apply,
                                                                  {"params": params}, ns["stats"])},
                                  clean)
  assert ns["evals"]["none (plain averaging)"]["clean"].at("vertex 2")["accuracy"] == \
      float(alone["accuracy"])
  assert "merged, evaluated alone: " in printed
  matrix = ns["matrices"]["none (plain averaging)"].matrix("error")
  assert matrix.shape == (4, 4) and np.all(np.diag(matrix) == 0) and matrix[0, 1] > 0.1
  assert (tmp_path / "many_models.png").stat().st_size > 10_000
