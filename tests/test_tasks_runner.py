"""tasks.runner: the one prologue (resolve, inputs, dry run or claim, run) and its outputs."""

import dataclasses
import json
import os
import types

import ml_collections
import pytest

from mechconn import workdir as workdir_lib
from mechconn.tasks import runner


@dataclasses.dataclass(frozen=True)
class _Spec:
  value: int
  dry_run: bool = False


def _task(calls, *, with_inputs=True, with_dry_run=True):
  """A task module with only the members given, recording how it was called."""

  def resolve(config, num_devices):
    calls.append(("resolve", num_devices))
    if config.value < 0:
      raise ValueError(f"config.value={config.value} must be >= 0.")
    return _Spec(config.value, config.dry_run)

  def run(spec, job):
    calls.append(("run", spec, job))
    return {"value": spec.value}

  members = dict(NAME="fake", LAYOUT=workdir_lib.Layout(files=("out.json",)), resolve=resolve,
                 run=run)
  if with_inputs:
    members["inputs"] = lambda spec, dry_run: (calls.append(("inputs", dry_run)) or
                                               ("loaded", {"source": {"step": 3}}))
  if with_dry_run:
    members["dry_run"] = lambda spec, job: (calls.append(("dry_run", job)) or {"dry": True})
  return types.SimpleNamespace(**members)


def _config(value=1, dry_run=False):
  return ml_collections.ConfigDict({"task": "fake", "value": value, "dry_run": dry_run})


def test_a_run_is_handed_its_spec_inputs_and_claimed_workdir(tmp_path):
  calls = []
  record = runner.launch(_task(calls), _config(), str(tmp_path / "w"), overwrite=True)
  assert record == {"value": 1}
  assert [c[0] for c in calls] == ["resolve", "inputs", "run"]
  _, spec, job = calls[-1]
  assert spec == _Spec(1) and job.inputs == "loaded" and job.overwrite
  assert job.workdir == str(tmp_path / "w") and job.mesh.devices.size == calls[0][1]
  with open(tmp_path / "w" / workdir_lib.CONFIG_FILE) as f:
    recorded = json.load(f)
  assert recorded["inputs"] == {"source": {"step": 3}} and recorded["value"] == 1
  assert job.config_dict["inputs"] == recorded["inputs"]


def test_a_bad_field_fails_before_the_workdir_is_touched(tmp_path):
  calls = []
  with pytest.raises(ValueError, match=r"config.value=-1 must be >= 0"):
    runner.launch(_task(calls), _config(-1), str(tmp_path / "w"))
  assert [c[0] for c in calls] == ["resolve"] and not (tmp_path / "w").exists()


def test_a_dry_run_writes_nothing_and_a_task_without_one_refuses_it(tmp_path):
  calls = []
  assert runner.launch(_task(calls), _config(dry_run=True), str(tmp_path / "w")) == {
      "dry": True}
  assert [c[0] for c in calls] == ["resolve", "inputs", "dry_run"]
  assert calls[-1][1].workdir == "" and not (tmp_path / "w").exists()
  with pytest.raises(ValueError, match=r"The fake task has no dry run"):
    runner.launch(_task([], with_dry_run=False), _config(dry_run=True), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_a_task_without_inputs_reads_none(tmp_path):
  calls = []
  runner.launch(_task(calls, with_inputs=False), _config(), str(tmp_path / "w"))
  assert [c[0] for c in calls] == ["resolve", "run"] and calls[-1][2].inputs is None
  with open(tmp_path / "w" / workdir_lib.CONFIG_FILE) as f:
    assert "inputs" not in json.load(f)


def test_write_outputs_writes_json_text_and_files(tmp_path):
  runner.write_outputs(str(tmp_path), {
      "a.json": {"x": 1}, "b.md": "# title\n",
      "c.bin": lambda path: open(path, "wb").write(b"\x00\x01")})
  with open(tmp_path / "a.json") as f:
    assert json.load(f) == {"x": 1}
  assert (tmp_path / "b.md").read_text() == "# title\n"
  assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
  assert sorted(os.listdir(tmp_path)) == ["a.json", "b.md", "c.bin"]  # no temporaries left
