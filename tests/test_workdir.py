"""mechconn.workdir: a workdir belongs to one config; metrics survive a kill."""

import json

import pytest

from mechconn import workdir as workdir_lib

CONFIG = {"seed": 0, "num_t": 5, "model": {"name": "small_cnn", "kwargs": {"width": 4}}}
OTHER = {**CONFIG, "model": {"name": "small_cnn", "kwargs": {"width": 8}}}


def test_same_config_may_rerun_and_different_config_is_refused(tmp_path):
  path = tmp_path / "result.json"
  workdir_lib.check_result_compatible(str(path), CONFIG)  # no file yet: fine
  workdir_lib.write_json_atomic(str(path), {"config": CONFIG, "loss": [1.0]})
  workdir_lib.check_result_compatible(str(path), CONFIG)  # same config: fine
  with pytest.raises(FileExistsError, match=r"differs in \['model.kwargs.width'\]"):
    workdir_lib.check_result_compatible(str(path), OTHER)
  assert json.loads(path.read_text())["loss"] == [1.0]
  assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temp file left


def test_unreadable_result_is_refused_and_kept(tmp_path):
  path = tmp_path / "result.json"
  path.write_text("{not json")
  with pytest.raises(FileExistsError, match="not readable JSON"):
    workdir_lib.check_result_compatible(str(path), CONFIG)
  assert path.read_text() == "{not json"


def test_claim_refuses_another_config_unless_overwriting(tmp_path):
  assert workdir_lib.claim(str(tmp_path / "w"), CONFIG) is False
  assert workdir_lib.claim(str(tmp_path / "w"), CONFIG) is False  # resume: fine
  with pytest.raises(FileExistsError, match=r"differs in \['model.kwargs.width'\].*--overwrite"):
    workdir_lib.claim(str(tmp_path / "w"), OTHER)
  recorded = json.loads((tmp_path / "w" / workdir_lib.CONFIG_FILE).read_text())
  assert recorded == CONFIG
  assert workdir_lib.claim(str(tmp_path / "w"), OTHER, overwrite=True) is True
  assert json.loads((tmp_path / "w" / workdir_lib.CONFIG_FILE).read_text()) == OTHER


def test_metrics_truncate_and_skip_a_torn_last_line(tmp_path):
  path = str(tmp_path / workdir_lib.METRICS_FILE)
  with workdir_lib.MetricsWriter(path) as writer:
    for step in (1, 2, 3, 4):
      writer.write({"step": step, "loss": 1.0 / step})
  with open(path, "a") as f:
    f.write('{"step": 5, "lo')  # a kill in the middle of a write
  assert [r["step"] for r in workdir_lib.read_metrics(path)] == [1, 2, 3, 4]
  workdir_lib.truncate_metrics(path, 2)
  assert workdir_lib.read_metrics(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
  with open(path, "a") as f:
    f.write("garbage\n")
    f.write('{"step": 3}\n')
  with pytest.raises(ValueError, match="line 3 is not JSON"):
    workdir_lib.read_metrics(path)
