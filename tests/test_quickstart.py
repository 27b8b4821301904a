"""End to end: the quickstart config through experiments/main.py on embedded data."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from mechconn import barriers



def run_main(workdir, *extra):
  return subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=experiments/configs/quickstart.py:quicktest", f"--workdir={workdir}", *extra],
      cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_quicktest_runs_and_records_a_consistent_barrier(tmp_path):
  proc = run_main(tmp_path, "--config.path.num_t=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "loss barrier" in proc.stdout
  record = json.loads((tmp_path / "linear_barrier.json").read_text())
  ts = np.asarray(record["ts"])
  np.testing.assert_allclose(ts, np.linspace(0, 1, 6), rtol=1e-6)
  assert record["summary"]["loss"] == pytest.approx(
      float(barriers.barrier_height(ts, np.asarray(record["loss"]))), rel=1e-6)
  assert record["summary"]["error"] == pytest.approx(
      float(barriers.barrier_height(ts, 1 - np.asarray(record["accuracy"]))), rel=1e-6)
  assert record["summary"]["loss_t"] == barriers.barrier_location(ts, np.asarray(record["loss"]))
  assert record["config"]["path"]["num_t"] == 6
  assert record["batchnorm_recomputed_from"] == "256 training examples"  # 2 x 128
  # A different config into the same workdir is refused and overwrites nothing.
  other = run_main(tmp_path, "--config.path.num_t=5")
  assert other.returncode != 0 and "different config" in other.stderr and "path.num_t" in other.stderr
  assert json.loads((tmp_path / "linear_barrier.json").read_text()) == record
  # The same config again is deterministic: same numbers.
  again = run_main(tmp_path, "--config.path.num_t=6")
  assert again.returncode == 0, again.stderr[-3000:]
  rerun = json.loads((tmp_path / "linear_barrier.json").read_text())
  assert rerun["loss"] == record["loss"] and rerun["accuracy"] == record["accuracy"]


@pytest.mark.slow
def test_unknown_config_key_and_preset_are_refused(tmp_path):
  proc = run_main(tmp_path, "--config.num_tt=3")
  assert proc.returncode != 0 and "num_tt" in proc.stderr
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=experiments/configs/quickstart.py:huge", f"--workdir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "valid presets" in proc.stderr


@pytest.mark.slow
def test_bad_value_is_refused_before_the_workdir_is_touched(tmp_path):
  proc = run_main(tmp_path / "w", "--config.optimizer.learning_rate=-0.05")
  assert proc.returncode != 0
  assert "config.optimizer.learning_rate=-0.05 must be > 0" in proc.stderr.splitlines()[-1]
  assert not (tmp_path / "w").exists()


def _train_launch(workdir, *extra):
  return subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=experiments/configs/train.py:cpu_cue,quicktest", f"--workdir={workdir}",
       *extra], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_launcher_keeps_third_party_info_lines_off_the_terminal(tmp_path):
  quiet = _train_launch(tmp_path / "quiet")
  assert quiet.returncode == 0, quiet.stderr[-3000:]
  info = re.compile(r"^I\d{4} ", re.MULTILINE)  # absl's INFO lines (orbax writes ~150)
  assert not info.search(quiet.stderr)
  assert quiet.stdout.strip().splitlines()[-1].startswith("rand_img")  # the result comes last
  verbose = _train_launch(tmp_path / "verbose", "--verbosity=0")
  assert verbose.returncode == 0, verbose.stderr[-3000:]
  assert len(info.findall(verbose.stderr)) > 10
