"""tasks.runs: finished runs as inputs (is it finished, and of this config?), path records."""

import json
import os

import numpy as np
import pytest

from mechconn import workdir as workdir_lib
from mechconn.tasks import runs

CONFIG = {"task": "train", "seed": 0, "model": {"name": "mlp", "kwargs": {}, "dtype": "float32"}}


def _finished_run(directory, config, inputs=None, record=None):
  os.makedirs(directory)
  recorded = {**config, workdir_lib.FORMAT_KEY: workdir_lib.FORMAT_VERSION}
  if inputs is not None:
    recorded["inputs"] = inputs
  workdir_lib.write_json_atomic(os.path.join(directory, workdir_lib.CONFIG_FILE), recorded)
  if record is not None:
    workdir_lib.write_json_atomic(os.path.join(directory, "result.json"), record)


def test_a_finished_run_of_this_config_gives_its_record(tmp_path):
  _finished_run(tmp_path / "a", CONFIG, record={"loss": 0.5})
  assert runs.finished_record(str(tmp_path / "a"), "result.json", CONFIG) == {"loss": 0.5}
  assert runs.finished_record(str(tmp_path / "a"), "result.json", {**CONFIG, "seed": 1}) is None
  # A field that never changes numbers may differ; one added since reads as what it did.
  old = {k: v for k, v in CONFIG.items()}
  old["model"] = {"name": "mlp", "kwargs": {}}
  _finished_run(tmp_path / "old", old, record={"loss": 0.5})
  assert runs.finished_record(str(tmp_path / "old"), "result.json",
                              {**CONFIG, "progress": False, "dry_run": False}) == {"loss": 0.5}
  assert runs.finished_record(str(tmp_path / "old"), "result.json",
                              {**CONFIG, "model": {**CONFIG["model"], "dtype": "bfloat16"}}
                              ) is None


def test_an_unfinished_run_is_not_finished(tmp_path):
  _finished_run(tmp_path / "a", CONFIG)  # claimed, no record yet
  assert runs.finished_record(str(tmp_path / "a"), "result.json", CONFIG) is None
  assert runs.finished_record(str(tmp_path / "missing"), "result.json", CONFIG) is None


def test_a_run_that_read_other_inputs_is_not_this_one(tmp_path):
  inputs = {"cue_model": {"config": CONFIG, "step": 8}}
  _finished_run(tmp_path / "a", {**CONFIG, "task": "finetune"}, inputs, {"loss": 0.5})
  config = {**CONFIG, "task": "finetune"}
  assert runs.finished_record(str(tmp_path / "a"), "result.json", config,
                              lambda: inputs) == {"loss": 0.5}
  moved = {"cue_model": {"config": CONFIG, "step": 16}}  # the cue model retrained since
  assert runs.finished_record(str(tmp_path / "a"), "result.json", config,
                              lambda: moved) is None
  reads = []  # identities are read (finished runs loaded) only when the config matches
  assert runs.finished_record(str(tmp_path / "a"), "result.json", {**config, "seed": 5},
                              lambda: reads.append(1) or inputs) is None
  assert not reads


def test_path_curves_are_lists_for_a_record():
  class Result:
    loss = np.asarray([0.1, 0.3, 0.2], np.float32)
    accuracy = np.asarray([0.9, 0.7, 0.8], np.float32)

  curves = runs.path_curves(Result())
  assert json.loads(json.dumps(curves)) == curves
  np.testing.assert_allclose(curves["loss"], Result.loss)
  np.testing.assert_allclose(curves["accuracy"], Result.accuracy)


def test_an_unfinished_train_run_is_refused_as_an_input(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"holds no finished train run"):
    runs.load_trained(str(tmp_path))
  _finished_run(tmp_path / "e", {**CONFIG, "task": "eval_path"}, record={})
  open(tmp_path / "e" / runs.FINAL_EVAL_FILE, "w").write("{}")
  with pytest.raises(ValueError, match=r"holds a 'eval_path' run, not a 'train' run"):
    runs.load_trained(str(tmp_path / "e"))
