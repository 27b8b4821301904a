"""mechconn.tasks.quickstart: its checks, its table, and the run through experiments/main.py."""

import json
import re

import numpy as np
import pytest

from experiments.configs import quickstart as quickstart_configs
from mechconn import barriers
from mechconn.tasks import quickstart

QUICKTEST = "--config=experiments/configs/quickstart.py:quicktest"


def test_format_path_table_lists_every_t_and_the_barriers():
  record = {"ts": [0.0, 0.5, 1.0], "loss": [0.1, 0.9, 0.2], "accuracy": [0.9, 0.5, 0.95],
            "summary": {"loss": 0.75, "loss_t": 0.5, "error": 0.425, "error_t": 0.5}}
  lines = quickstart.format_path_table(record).splitlines()
  assert lines[2].split() == ["0.500", "0.9000", "0.5000"]
  assert lines[-2] == "loss barrier  0.7500 (at t = 0.500)"
  assert lines[-1] == "error barrier 0.4250"


@pytest.mark.parametrize("key, value, message", [
    ("path.num_t", 1, r"config.path.num_t=1 must be at least 2"),
    ("path.bn_examples", 100, r"path.bn_examples=100 makes no full batch of eval_batch_size=128"),
    ("path.bn_examples", 4096, r"path.bn_examples=4096 exceeds config.data.num_train=1024"),
    ("optimizer.momentum", 1.0, r"config.optimizer.momentum=1.0 must be in \[0, 1\)"),
    ("batch_size", 2048, r"batch_size=2048 exceeds the 1024 training examples"),
])
def test_quickstart_config_errors_name_the_field(key, value, message):
  config = quickstart_configs.get_config("quicktest")
  section, _, field = key.rpartition(".")
  (config[section] if section else config)[field] = value
  with pytest.raises(ValueError, match=message):
    quickstart.resolve(config, num_devices=1)


@pytest.mark.slow
def test_quicktest_runs_and_records_a_consistent_barrier(tmp_path, launch):
  proc = launch(QUICKTEST, f"--workdir={tmp_path}", "--config.path.num_t=6")
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
  other = launch(QUICKTEST, f"--workdir={tmp_path}", "--config.path.num_t=5")
  assert other.returncode != 0
  assert "different config" in other.stderr and "path.num_t" in other.stderr
  assert json.loads((tmp_path / "linear_barrier.json").read_text()) == record
  # The same config again is deterministic: same numbers.
  again = launch(QUICKTEST, f"--workdir={tmp_path}", "--config.path.num_t=6")
  assert again.returncode == 0, again.stderr[-3000:]
  rerun = json.loads((tmp_path / "linear_barrier.json").read_text())
  assert rerun["loss"] == record["loss"] and rerun["accuracy"] == record["accuracy"]


@pytest.mark.slow
def test_unknown_config_key_and_preset_are_refused(tmp_path, launch):
  proc = launch(QUICKTEST, f"--workdir={tmp_path}", "--config.num_tt=3")
  assert proc.returncode != 0 and "num_tt" in proc.stderr
  proc = launch("--config=experiments/configs/quickstart.py:huge", f"--workdir={tmp_path}")
  assert proc.returncode != 0 and "valid presets" in proc.stderr


@pytest.mark.slow
def test_bad_value_is_refused_before_the_workdir_is_touched(tmp_path, launch):
  proc = launch(QUICKTEST, f"--workdir={tmp_path / 'w'}", "--config.optimizer.learning_rate=-0.05")
  assert proc.returncode != 0
  assert "config.optimizer.learning_rate=-0.05 must be > 0" in proc.stderr.splitlines()[-1]
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_launcher_keeps_third_party_info_lines_off_the_terminal(tmp_path, launch):
  train = "--config=experiments/configs/train.py:cpu_cue,quicktest"
  quiet = launch(train, f"--workdir={tmp_path / 'quiet'}")
  assert quiet.returncode == 0, quiet.stderr[-3000:]
  info = re.compile(r"^I\d{4} ", re.MULTILINE)  # absl's INFO lines (orbax writes ~150)
  assert not info.search(quiet.stderr)
  assert quiet.stdout.strip().splitlines()[-1].startswith("rand_img")  # the result comes last
  verbose = launch(train, f"--workdir={tmp_path / 'verbose'}", "--verbosity=0")
  assert verbose.returncode == 0, verbose.stderr[-3000:]
  assert len(info.findall(verbose.stderr)) > 10
