"""mechconn.workdir: a workdir belongs to one config; metrics survive a kill."""

import json
import os
import socket
import subprocess
import sys

import pytest

from mechconn import workdir as workdir_lib
from mechconn.tasks import records

CONFIG = {"task": "train", "seed": 0, "num_t": 5,
          "model": {"name": "small_cnn", "kwargs": {"width": 4}}}
OTHER = {**CONFIG, "model": {"name": "small_cnn", "kwargs": {"width": 8}}}


LAYOUT = workdir_lib.Layout(files=("metrics.jsonl", "result.json"),
                            checkpoint_dirs=("checkpoints",))


def _claim(workdir, config, **kwargs):
  """A claim as the tasks make it (configs recorded earlier read in today's fields)."""
  with workdir_lib.claim(str(workdir), config, LAYOUT, vocabulary=records.VOCABULARY, **kwargs):
    pass


def _tree(root):
  """Files and directories (these with a trailing '/') under root, relative to it."""
  return sorted([os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                 for f in fs] + [os.path.relpath(os.path.join(d, x), root) + "/"
                                 for d, dirs, _ in os.walk(root) for x in dirs])


def test_claim_refuses_another_config_unless_overwriting(tmp_path):
  w = tmp_path / "w"
  _claim(w, CONFIG)
  _claim(w, CONFIG)  # resume: fine
  with pytest.raises(FileExistsError, match=r"differs in \['model.kwargs.width'\].*--overwrite"):
    _claim(w, OTHER)
  assert _recorded(w) == CONFIG
  _claim(w, OTHER, overwrite=True)
  assert _recorded(w) == OTHER


def _recorded(workdir):
  """The config recorded in a workdir, less mechconn's mark (which must be there)."""
  recorded = json.loads((workdir / workdir_lib.CONFIG_FILE).read_text())
  assert recorded.pop(workdir_lib.FORMAT_KEY) == workdir_lib.FORMAT_VERSION
  return recorded


def test_overwrite_deletes_only_what_the_task_wrote(tmp_path):
  w = tmp_path / "w"
  _claim(w, CONFIG)
  for name in ("metrics.jsonl", "result.json", "notes.txt", "checkpoints/README",
               "checkpoints/10/default/d/0123456789abcdef0123456789abcdef", "checkpoints/10/_CHECKPOINT_METADATA",
               "checkpoints/20.orbax-checkpoint-tmp-171/default/_METADATA",
               "checkpoints/30/default/manifest.ocdbt", "checkpoints/30/results/eval_path.json",
               "checkpoints/best/state", "data/train.npz"):
    (w / name).parent.mkdir(parents=True, exist_ok=True)
    (w / name).write_text("x")
  # Step 30 holds a workdir nested in it (not orbax's): overwriting would keep it, and the
  # new run would resume from it, so the overwrite is refused until it is moved away.
  before = _tree(w)
  with pytest.raises(FileExistsError, match=r"--overwrite would keep .*checkpoints/30: it holds "
                                            r"\['results'\].*resume from.*Move them out"):
    _claim(w, OTHER, overwrite=True)
  assert _tree(w) == before and _recorded(w) == CONFIG
  os.rename(w / "checkpoints/30/results", w / "results_of_30")
  (w / "checkpoints/10/default/mine.txt").write_text("x")  # a user's file inside orbax's item
  with pytest.raises(FileExistsError, match=r"checkpoints/10: it holds \['default/mine.txt'\]"):
    _claim(w, OTHER, overwrite=True)
  os.rename(w / "checkpoints/10/default/mine.txt", w / "mine.txt")
  _claim(w, OTHER, overwrite=True)
  assert _tree(w) == sorted([".mechconn.lock", "config.json", "notes.txt", "checkpoints/",
                             "checkpoints/README", "checkpoints/best/", "checkpoints/best/state",
                             "data/", "data/train.npz", "mine.txt", "results_of_30/",
                             "results_of_30/eval_path.json"])
  assert _recorded(w) == OTHER


def test_a_config_json_that_is_not_this_tasks_is_never_written_over(tmp_path):
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
  (hf / "metrics.jsonl").write_text("theirs")
  before = _tree(hf)
  for overwrite in (False, True):
    with pytest.raises(FileExistsError, match="mechconn did not write.*with or without"):
      _claim(hf, {**CONFIG, "task": "train"}, overwrite=overwrite)
  other_task = tmp_path / "other"
  _claim(other_task, {**CONFIG, "task": "eval_path"})
  with pytest.raises(FileExistsError, match=r"holds a mechconn 'eval_path' run, not a 'train'"):
    _claim(other_task, {**CONFIG, "task": "train"}, overwrite=True)
  assert _tree(hf) == before and (hf / "metrics.jsonl").read_text() == "theirs"


def test_a_run_of_a_renamed_task_is_a_different_config_of_the_new_one(tmp_path):
  old = {"task": "linear_barrier", "seed": 0, "num_t": 5}  # the quickstart before the rename
  w = tmp_path / "w"
  _claim(w, old)
  new = {"task": "quickstart", "seed": 0, "path": {"num_t": 5}}
  with pytest.raises(FileExistsError, match=r"different config.*differs in \['num_t', "
                                            r"'path.num_t', 'task'\]"):
    _claim(w, new)
  _claim(w, new, overwrite=True)
  assert _recorded(w) == new


def test_files_named_like_outputs_without_a_config_are_never_deleted(tmp_path):
  w = tmp_path / "w"
  (w / "checkpoints" / "1000").mkdir(parents=True)  # e.g. another orbax project's
  (w / "metrics.jsonl").write_text("theirs")
  before = _tree(w)
  for overwrite in (False, True):
    with pytest.raises(FileExistsError, match=r"files named like this task's outputs .*"
                                              r"no config.json.*with or without --overwrite"):
      _claim(w, CONFIG, overwrite=overwrite)
  assert _tree(w) == before


def test_fields_that_do_not_change_results_may_change_on_a_relaunch(tmp_path):
  config = {**CONFIG, "progress": True, "data": {"data_dir": "", "download": False}}
  _claim(tmp_path, config)
  _claim(tmp_path, {**config, "progress": False,
                    "data": {"data_dir": "/data/tfds", "download": True}})


def test_a_file_as_workdir_is_refused(tmp_path):
  (tmp_path / "model.bin").write_text("weights")
  with pytest.raises(FileExistsError, match=r"model.bin is a file, not a directory"):
    _claim(tmp_path / "model.bin", CONFIG)
  assert (tmp_path / "model.bin").read_text() == "weights"


def test_unreadable_config_is_refused_and_kept(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(FileExistsError, match="not readable JSON"):
    _claim(tmp_path, CONFIG, overwrite=True)
  assert (tmp_path / "config.json").read_text() == "{not json"


HOLD = """
import sys, time
from mechconn import workdir
with workdir.lock(sys.argv[1]):
  print("holding", flush=True)
  time.sleep(120)
"""


def test_lock_names_a_live_holder_and_takes_over_from_a_killed_one(tmp_path):
  w = str(tmp_path / "w")
  holder = subprocess.Popen([sys.executable, "-c", HOLD, w], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "holding"
    with pytest.raises(workdir_lib.WorkdirBusyError,
                       match=rf"in use by another mechconn job \(pid {holder.pid} on host "
                             rf"'{socket.gethostname()}'"):
      _claim(w, CONFIG)
    assert not os.path.exists(os.path.join(w, workdir_lib.CONFIG_FILE))  # nothing written
  finally:
    holder.kill()  # SIGKILL: the lock file stays behind, naming the dead holder
    holder.wait()
  assert str(holder.pid) in open(os.path.join(w, workdir_lib.LOCK_FILE)).read()
  with workdir_lib.claim(w, CONFIG, LAYOUT):  # the kernel released the dead one's lock
    record = json.loads(open(os.path.join(w, workdir_lib.LOCK_FILE)).read())
    assert record["pid"] == os.getpid()
  assert open(os.path.join(w, workdir_lib.LOCK_FILE)).read() == ""  # released cleanly


def test_a_workdir_claimed_in_this_process_is_refused_again(tmp_path):
  with workdir_lib.claim(str(tmp_path), CONFIG, LAYOUT):
    with pytest.raises(workdir_lib.WorkdirBusyError, match="already claimed by this process"):
      _claim(tmp_path, CONFIG)
  _claim(tmp_path, CONFIG)  # released on exit


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


def test_a_study_recorded_before_the_protocol_options_compares_equal():
  """Runs recorded without the fields this work added read as what they did (defaults; the
  scratch baseline's rate, never used by them, as anything); a changed value is named."""
  from experiments.configs import reproduce as reproduce_configs
  config = reproduce_configs.get_config("cpu")
  recorded = workdir_lib.config_to_dict(config)
  del recorded["train"]["data"]["test_cue_proportion"], recorded["path"]["bn_variance"]
  del recorded["finetune"]["cbft"]["cue_set"], recorded["finetune"]["cbft"]["barrier_loss"]
  del recorded["finetune"]["scratch"]
  assert workdir_lib.config_differences(recorded, workdir_lib.config_to_dict(config),
                                        records.VOCABULARY) == []
  del recorded["finetune"]["cbft"]["schedule_per"]  # before it, CBFT's schedule ran per update
  assert workdir_lib.config_differences(recorded, workdir_lib.config_to_dict(config),
                                        records.VOCABULARY) == [
      "finetune.cbft.schedule_per"]
  recorded["finetune"]["cbft"]["schedule_per"] = "iteration"
  config.finetune.scratch.learning_rate = 0.3
  config.finetune.cbft.cue_set = "as_split"
  assert workdir_lib.config_differences(recorded, workdir_lib.config_to_dict(config),
                                        records.VOCABULARY) == [
      "finetune.cbft.cue_set"]


def test_an_eval_path_recorded_before_activation_sites_reads_as_what_it_did():
  """Before the field, activation matching correlated module outputs; other alignments never
  used it, so their records compare equal to any value."""
  from experiments.configs import eval_path as eval_path_configs
  config = eval_path_configs.get_config("cpu")
  recorded = workdir_lib.config_to_dict(config)
  del recorded["activation_sites"]
  assert workdir_lib.config_differences(recorded, workdir_lib.config_to_dict(config),
                                        records.VOCABULARY) == []
  recorded["align"] = config.align = "activation"
  assert workdir_lib.config_differences(recorded, workdir_lib.config_to_dict(config),
                                        records.VOCABULARY) == [
      "activation_sites"]
  config.activation_sites = "module_outputs"
  assert workdir_lib.config_differences(recorded, workdir_lib.config_to_dict(config),
                                        records.VOCABULARY) == []


def test_a_foreign_config_with_a_task_key_is_not_taken_for_a_run(tmp_path):
  """A "task" key alone does not make a config.json mechconn's: --overwrite deletes nothing."""
  w = tmp_path / "theirs"
  w.mkdir()
  foreign = {"task": "train", "model_dir": "/models/x", "lr": 0.1}
  (w / "config.json").write_text(json.dumps(foreign))
  for name in ("metrics.jsonl", "final_eval.json"):
    (w / name).write_text("theirs")
  before = _tree(w)
  for overwrite in (False, True):
    with pytest.raises(FileExistsError, match="mechconn did not write.*Nothing was changed"):
      _claim(w, CONFIG, overwrite=overwrite)
  assert _tree(w) == before and json.loads((w / "config.json").read_text()) == foreign


def test_a_run_recorded_before_the_mark_is_still_this_tasks(tmp_path):
  """Legacy records (no mark) are recognised by their task and whole top-level layout,
  fields added since (`tasks.records.ADDED_FIELDS`) allowed missing; a future format is not ours."""
  w = tmp_path / "w"
  w.mkdir()
  legacy = {k: v for k, v in CONFIG.items()}
  (w / "config.json").write_text(json.dumps(legacy))
  _claim(w, CONFIG)  # resumes
  assert _recorded(w) == CONFIG
  (w / "config.json").write_text(json.dumps(legacy))
  _claim(w, {**CONFIG, "allow_identical_endpoints": False})  # an added field, at its old value
  for future in ({**CONFIG, workdir_lib.FORMAT_KEY: 99},):
    (w / "config.json").write_text(json.dumps(future))
    with pytest.raises(FileExistsError, match="a run of another mechconn .* is 99"):
      _claim(w, CONFIG)


def test_a_refused_launch_takes_its_claim_back(tmp_path):
  """A run that fails before writing any output leaves no config.json: the corrected
  command is not refused as a different config. One that wrote outputs keeps it."""
  w = tmp_path / "w"
  with pytest.raises(RuntimeError, match="late check"):
    with workdir_lib.claim(str(w), CONFIG, LAYOUT):
      raise RuntimeError("late check")
  assert not (w / "config.json").exists()
  _claim(w, OTHER)  # the corrected command
  assert _recorded(w) == OTHER
  with pytest.raises(RuntimeError, match="crashed"):
    with workdir_lib.claim(str(w), OTHER, LAYOUT):  # a resume that fails: config.json stays
      raise RuntimeError("crashed")
  assert _recorded(w) == OTHER
  w2 = tmp_path / "w2"
  with pytest.raises(RuntimeError, match="after writing"):
    with workdir_lib.claim(str(w2), CONFIG, LAYOUT):
      (w2 / "metrics.jsonl").write_text("{}\n")
      raise RuntimeError("after writing")
  assert _recorded(w2) == CONFIG


def test_workdir_faults_are_named(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="workdir is empty"):
    _claim("", CONFIG)
  w = tmp_path / "w"
  (w / workdir_lib.LOCK_FILE).mkdir(parents=True)
  with pytest.raises(FileExistsError, match=r"\.mechconn\.lock is a directory.*move it away"):
    _claim(w, CONFIG)
  assert not (w / "config.json").exists()
  d = tmp_path / "d"
  d.mkdir()
  (d / workdir_lib.LOCK_FILE).symlink_to(tmp_path / "nowhere")
  with pytest.raises(FileExistsError, match=r"\.mechconn\.lock is a directory \(or another "
                                            r"non-file\)"):
    _claim(d, CONFIG)
  (tmp_path / "f").write_text("x")
  with pytest.raises(FileExistsError, match=r"/f is a file, not a directory \(the run's workdir"):
    _claim(tmp_path / "f" / "run", CONFIG)
  c = tmp_path / "c"
  c.mkdir()
  (c / "checkpoints").write_text("notes")
  with pytest.raises(FileExistsError, match=r"checkpoints is a file, not a directory \(the "
                                            r"run's checkpoints"):
    _claim(c, CONFIG)
  assert sorted(os.listdir(c)) == ["checkpoints"]
  # An unwritable checkpoint directory is refused before the run trains (as root, whom
  # permissions do not stop, the refusal is simulated through os.access).
  r = tmp_path / "r"
  (r / "checkpoints").mkdir(parents=True)
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode: (
      not str(p).endswith("checkpoints") and real_access(p, mode)))
  with pytest.raises(PermissionError, match=r"checkpoints is not writable.*Nothing was changed"):
    _claim(r, CONFIG)
  assert sorted(os.listdir(r)) == ["checkpoints"]
