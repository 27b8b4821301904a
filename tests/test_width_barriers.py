"""benchmarks/width_barriers.py: its statistics by hand, its checks, its smoke preset end to end."""

import dataclasses
import importlib.util
import json
import math
import os

import numpy as np
import pytest

from mechconn import barriers

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "width_barriers.py")
_SPEC = importlib.util.spec_from_file_location("width_barriers", _PATH)
wb = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(wb)


def test_mean_interval_by_hand():
  # mean 2.5; sd = sqrt(5 / 3); se = sd / 2; t(0.975, 3 dof) = 3.182446305...
  out = wb.mean_interval([1.0, 2.0, 3.0, 4.0])
  half = 3.182446305284263 * math.sqrt(5 / 3) / 2
  assert out["mean"] == pytest.approx(2.5)
  assert out["ci_low"] == pytest.approx(2.5 - half, rel=1e-9)
  assert out["ci_high"] == pytest.approx(2.5 + half, rel=1e-9)
  assert wb.mean_interval([0.3, 0.3, 0.3]) == pytest.approx(
      {"mean": 0.3, "ci_low": 0.3, "ci_high": 0.3})
  with pytest.raises(ValueError, match="at least 2"):
    wb.mean_interval([1.0])


def test_midpoint_barrier_by_hand():
  ts = np.linspace(0, 1, 5)
  assert wb.midpoint_barrier(ts, np.array([1.0, 3.0, 5.0, 2.0, 0.0])) == pytest.approx(4.5)
  with pytest.raises(ValueError, match="t = 0.5"):
    wb.midpoint_barrier(np.linspace(0, 1, 4), np.zeros(4))


def test_path_statistics_in_points():
  ts = np.linspace(0, 1, 3)
  path = barriers.PathEval.classification(ts, loss=np.array([0.5, 1.5, 0.3]),
                                          accuracy=np.array([0.9, 0.6, 0.8]))
  out = wb.path_statistics(path)
  # loss: 1.5 - 0.4; error: 0.4 - (0.1 + 0.2) / 2 = 0.25, i.e. 25 points.
  assert out["max_loss"] == pytest.approx(1.1) and out["mid_loss"] == pytest.approx(1.1)
  assert out["max_error"] == pytest.approx(25.0) and out["mid_error"] == pytest.approx(25.0)


def test_bad_presets_raise():
  with pytest.raises(ValueError, match="Unknown preset"):
    wb.preset_named("tpu")
  smoke = wb.PRESETS["smoke"]
  for change, match in [({"widths": (0, 1)}, "Widths"), ({"num_pairs": 1}, "2 pairs"),
                        ({"num_t": 4}, "odd"), ({"dataset": "cifar10"}, "embedded"),
                        ({"optimizer": "lamb"}, "optimizer")]:
    with pytest.raises(ValueError, match=match):
      wb.check_preset(dataclasses.replace(smoke, **change))
  for name in wb.PRESETS:
    wb.preset_named(name)


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path, capsys):
  record = wb.run("smoke", str(tmp_path))
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  stored = json.loads((tmp_path / "width_barriers.json").read_text())
  assert stored["rows"] == json.loads(json.dumps(record["rows"]))
  assert (tmp_path / "width_barriers.png").stat().st_size > 0
  preset = wb.PRESETS["smoke"]
  expected = {(norm, w, column, s) for norm in wb.NORMS for w in preset.widths
              for column, _, _ in wb.ALIGNMENTS[norm] for s in wb.STATISTICS}
  assert {(r["norm"], r["width"], r["alignment"], r["statistic"]) for r in stored["rows"]} \
      == expected
  assert len(lines) == len(expected) + 1 and lines[-1]["preset"] == "smoke"
  for row in stored["rows"]:
    numbers = [row["mean"], row["ci_low"], row["ci_high"], *row["values"],
               *row["end_accuracy"].values()]
    assert np.all(np.isfinite(numbers)), row
    assert row["ci_low"] <= row["mean"] <= row["ci_high"]
    assert len(row["values"]) == row["num_pairs"] == preset.num_pairs
    assert row["mean"] == pytest.approx(np.mean(row["values"]))
    assert len(row["end_accuracies"]) == 2 * preset.num_pairs
    if row["statistic"].startswith("max"):
      assert min(row["values"]) >= 0  # a maximum over t includes the ends: never negative
  # A rerun finds every network in the cache: nothing is trained again.
  assert wb.run("smoke", str(tmp_path))["summary"]["train_s"] == 0.0
