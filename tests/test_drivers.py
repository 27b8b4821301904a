"""mechconn.drivers helpers: result files are never silently replaced."""

import json

import pytest

from mechconn import drivers

CONFIG = {"seed": 0, "num_t": 5, "model": {"name": "small_cnn", "kwargs": {"width": 4}}}


def test_same_config_may_rerun_and_different_config_is_refused(tmp_path):
  path = tmp_path / drivers.RESULT_FILE
  drivers.check_result_compatible(str(path), CONFIG)  # no file yet: fine
  drivers.write_json_atomic(str(path), {"config": CONFIG, "loss": [1.0]})
  drivers.check_result_compatible(str(path), CONFIG)  # same config: fine
  other = {**CONFIG, "model": {"name": "small_cnn", "kwargs": {"width": 8}}}
  with pytest.raises(FileExistsError, match=r"differs in \['model.kwargs.width'\]"):
    drivers.check_result_compatible(str(path), other)
  assert json.loads(path.read_text())["loss"] == [1.0]
  assert [p.name for p in tmp_path.iterdir()] == [drivers.RESULT_FILE]  # no temp file left


def test_unreadable_result_is_refused_and_kept(tmp_path):
  path = tmp_path / drivers.RESULT_FILE
  path.write_text("{not json")
  with pytest.raises(FileExistsError, match="not a readable mechconn result"):
    drivers.check_result_compatible(str(path), CONFIG)
  assert path.read_text() == "{not json"


def test_format_path_table_lists_every_t_and_the_barriers():
  record = {"ts": [0.0, 0.5, 1.0], "loss": [0.1, 0.9, 0.2], "accuracy": [0.9, 0.5, 0.95],
            "loss_barrier": 0.75, "loss_barrier_t": 0.5, "error_barrier": 0.425}
  lines = drivers.format_path_table(record).splitlines()
  assert lines[2].split() == ["0.500", "0.9000", "0.5000"]
  assert lines[-2] == "loss barrier  0.7500 (at t = 0.500)"
  assert lines[-1] == "error barrier 0.4250"
