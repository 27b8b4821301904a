"""mechconn.tasks.train: the train task's build, run, dry run, and its workdir rules."""

import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from experiments.configs import train as train_configs
from mechconn import checkpoint
from mechconn import dry_run as dry_run_lib
from mechconn import finite
from mechconn import loop
from mechconn import tasks
from mechconn import workdir as workdir_lib
from mechconn.tasks import optim
from mechconn.tasks import specs
from mechconn.tasks import runs
from mechconn.tasks import train as train_task


def _saved_steps(workdir):
  """The checkpoint steps in a workdir, each checked to hold only finite numbers."""
  with checkpoint.Checkpointer(str(workdir / loop.CHECKPOINT_DIR)) as ckpt:
    steps = ckpt.all_steps()
    assert all(bool(finite.all_finite_jit(ckpt.read(s))) for s in steps)
  return steps


def _spy_on_build(monkeypatch, task):
  """Records every Build that `task.build` returns."""
  built = []
  original = task.build

  def spy(*args, **kwargs):
    built.append(original(*args, **kwargs))
    return built[-1]

  monkeypatch.setattr(task, "build", spy)
  return built


@pytest.mark.slow  # a dry run and a whole tiny train run
def test_run_and_dry_run_share_one_builder(monkeypatch, tmp_path):
  """The dry run times the step function the run hands to the loop: both come from build."""
  built = _spy_on_build(monkeypatch, train_task)
  timed, looped = [], []
  time_step = dry_run_lib.time_step
  train_loop = loop.train_loop
  monkeypatch.setattr(dry_run_lib, "time_step",
                      lambda name, step, *a, **k: timed.append(step) or time_step(name, step,
                                                                                   *a, **k))
  monkeypatch.setattr(loop, "train_loop",  # the device pipeline wraps the step with its draw
                      lambda init_fn, step_fn, *a, **k: looped.append(
                          (init_fn, getattr(step_fn, "__wrapped__", step_fn)))
                      or train_loop(init_fn, step_fn, *a, **k))
  config = train_configs.get_config("cpu_cue,quicktest")
  config.num_epochs = 1
  dry = train_configs.get_config("cpu_cue,quicktest")
  dry.num_epochs, dry.dry_run = 1, True
  tasks.run(dry, str(tmp_path / "dry"))
  tasks.run(config, str(tmp_path / "run"))
  assert len(built) == 2 and timed == [built[0].step_fn] and looped == [
      (built[1].init_fn, built[1].step_fn)]
  # The two builds are the same construction: same step function, loss, optimiser and key.
  for b in built:
    assert b.step_fn.func is built[0].step_fn.func
    loss_fn = b.step_fn.keywords["loss_fn"]
    assert type(loss_fn) is type(built[0].step_fn.keywords["loss_fn"])
    assert repr(loss_fn.apply_fn.__self__) == repr(built[0].model)  # the same network
  np.testing.assert_array_equal(jax.random.key_data(built[0].step_fn.keywords["root_key"]),
                                jax.random.key_data(built[1].step_fn.keywords["root_key"]))
  assert not os.path.exists(tmp_path / "dry")  # the dry run wrote nothing


def test_per_device_batch_size_is_a_value_not_a_write():
  config = train_configs.get_config("cpu_cue,quicktest")
  with config.unlocked():
    config.per_device_batch_size = 4
  assert train_task.resolve(config, num_devices=8).loop.batch_size == 32
  assert config.batch_size == 32 and config.per_device_batch_size == 4  # unchanged
  config.batch_size = 7  # ignored while per_device_batch_size is set
  assert train_task.resolve(config, num_devices=2).loop.batch_size == 8


def test_make_optimizer_takes_a_learning_rate_override():
  opt = ml_collections.ConfigDict({"name": "sgd", "learning_rate": 0.1, "momentum": 0.9,
                                   "weight_decay": 0.0,
                                   "schedule": "constant", "decay_every_epochs": 0,
                                   "decay_factor": 0.1, "warmup_steps": 0})
  opt = specs.optimizer_spec(opt)
  _, own = optim.make_optimizer(opt, num_steps=10, steps_per_epoch=5)
  _, override = optim.make_optimizer(opt, num_steps=10, steps_per_epoch=5, learning_rate=0.001)
  assert float(own(3)) == pytest.approx(0.1) and float(override(3)) == pytest.approx(0.001)


@pytest.mark.slow
def test_diverging_train_task_writes_no_result_and_no_bad_checkpoint(tmp_path):
  config = train_configs.get_config("cpu_cue,quicktest")
  config.optimizer.learning_rate = 1e3  # was: exit 0, NaN parameters, a normal final_eval
  with pytest.raises(finite.NonFiniteError, match="diverged at step"):
    tasks.run(config, str(tmp_path))
  assert not (tmp_path / train_task.FINAL_EVAL_FILE).exists()
  _saved_steps(tmp_path)  # every checkpoint left is finite


@pytest.mark.slow
def test_a_diverged_run_is_refused_as_a_model(tmp_path):
  config = train_configs.get_config("cpu_cue,quicktest")
  tasks.run(config, str(tmp_path))
  with checkpoint.Checkpointer(str(tmp_path / loop.CHECKPOINT_DIR)) as ckpt:
    state = ckpt.read()
    state["params"]["head"]["bias"] = state["params"]["head"]["bias"] * np.nan
    ckpt.save(1000, state)  # as an older mechconn could have left it
  with pytest.raises(finite.NonFiniteError, match=r"checkpoints/1000 \(first at params/head/bias"):
    runs.load_trained(str(tmp_path))


@pytest.mark.slow
def test_overwrite_replaces_the_run_and_keeps_the_users_files(tmp_path):
  config = train_configs.get_config("cpu_cue,quicktest")
  tasks.run(config, str(tmp_path))
  (tmp_path / "notes.md").write_text("mine")
  (tmp_path / loop.CHECKPOINT_DIR / "best_by_hand").mkdir()
  (tmp_path / loop.CHECKPOINT_DIR / "best_by_hand" / "weights.npz").write_text("mine")
  other = train_configs.get_config("cpu_cue,quicktest")
  other.seed = 3
  with pytest.raises(FileExistsError, match=r"differs in \['seed'\]"):
    tasks.run(other, str(tmp_path))
  record = tasks.run(other, str(tmp_path), overwrite=True)
  assert record["config"]["seed"] == 3
  assert (tmp_path / "notes.md").read_text() == "mine"
  assert (tmp_path / loop.CHECKPOINT_DIR / "best_by_hand" / "weights.npz").read_text() == "mine"
  steps = [r["step"] for r in workdir_lib.read_metrics(str(tmp_path / workdir_lib.METRICS_FILE))
           if "train/loss" in r]
  assert steps == sorted(set(steps))  # one run's metrics, not two appended


@pytest.mark.slow
def test_a_workdir_held_by_a_live_job_is_refused(tmp_path):
  hold = ("import sys, time\nfrom mechconn import workdir\n"
          "with workdir.lock(sys.argv[1]):\n  print('holding', flush=True)\n  time.sleep(60)\n")
  holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "holding"
    with pytest.raises(workdir_lib.WorkdirBusyError, match=rf"pid {holder.pid}"):
      tasks.run(train_configs.get_config("cpu_cue,quicktest"), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [workdir_lib.LOCK_FILE]
  finally:
    holder.kill()
    holder.wait()


@pytest.mark.slow
def test_device_and_host_pipelines_train_bitwise_the_same_model(tmp_path):
  finals = {}
  for mode in ("host", "device"):
    config = train_configs.get_config("cpu_cue,quicktest")
    config.data.pipeline = mode
    record = tasks.run(config, str(tmp_path / mode))
    with checkpoint.Checkpointer(str(tmp_path / mode / loop.CHECKPOINT_DIR)) as ckpt:
      finals[mode] = ckpt.read()
    finals[mode + " views"] = record["views"]
  for a, b in zip(jax.tree.leaves(finals["host"]), jax.tree.leaves(finals["device"])):
    np.testing.assert_array_equal(a, b)
  assert finals["host views"] == finals["device views"]
  # The pipeline is not part of what a run's numbers depend on: a relaunch may change it.
  config = train_configs.get_config("cpu_cue,quicktest")
  config.data.pipeline = "host"
  tasks.run(config, str(tmp_path / "device"))
