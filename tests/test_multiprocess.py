"""Two processes on this machine (gloo collectives on CPU): the multi-host code, for real.

Each process owns 2 fake CPU devices, loads only its rows of every batch, and
the job's mesh spans the 4 devices of both; checkpoints and records come from
the processes as on a pod slice. Training, a killed job's relaunch, path
evaluation and the fine-tuning study run here as on one process.
This is the rehearsal for a TPU pod slice:

  XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo python -m experiments.main \\
      --config=... --workdir=W --coordinator_address=localhost:PORT \\
      --num_processes=2 --process_id=I          # once per process, I = 0, 1
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from experiments.configs import fit_curve as fit_curve_config
from experiments.configs import train as train_config
from mechconn import checkpoint
from mechconn import loop
from mechconn import tasks
from mechconn import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

pytestmark = pytest.mark.slow  # launches several training processes
TRAIN = "experiments/configs/train.py:cpu_cue,quicktest"
LONG = ["--config.num_epochs=8", "--config.log_every_steps=1"]  # 16 steps/epoch: 128 steps


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _spawn(config, workdir, num_processes: int, devices_per_process: int, *extra):
  """The job's processes, started (not waited for)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  command = [sys.executable, "-m", "experiments.main", f"--config={config}",
             f"--workdir={workdir}", *extra]
  per_process = [[]]
  if num_processes > 1:
    port = _free_port()
    per_process = [[f"--coordinator_address=localhost:{port}",
                    f"--num_processes={num_processes}", f"--process_id={i}"]
                   for i in range(num_processes)]
  return [subprocess.Popen(command + flags, cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for flags in per_process]


def _launch(config, workdir, num_processes: int, devices_per_process: int, *extra):
  procs = _spawn(config, workdir, num_processes, devices_per_process, *extra)
  outputs = [p.communicate(timeout=400) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return outputs


def _checkpoint(workdir):
  with checkpoint.Checkpointer(str(workdir / loop.CHECKPOINT_DIR)) as ckpt:
    return ckpt.read()


def _record(path):
  with open(path) as f:
    return json.load(f)


def _assert_close(a, b, path="", atol=1e-4):
  """Every number of two records within atol (timings and device counts aside)."""
  if isinstance(a, dict):
    assert a.keys() == b.keys(), path
    for k in a:
      if k not in ("seconds", "wall_seconds", "devices", "path_eval_sharded_over", "workdir",
                   "checkpoint", "config"):
        _assert_close(a[k], b[k], f"{path}/{k}", atol)
  elif isinstance(a, list):
    assert len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_close(x, y, f"{path}[{i}]", atol)
  elif isinstance(a, float):
    assert b == pytest.approx(a, abs=atol), path
  else:
    assert a == b, path


def test_a_job_killed_in_one_process_resumes_when_both_are_relaunched(tmp_path):
  _launch(TRAIN, tmp_path / "uninterrupted", 2, 2, *LONG)
  workdir = tmp_path / "killed"
  procs = _spawn(TRAIN, workdir, 2, 2, *LONG)
  metrics = workdir / workdir_lib.METRICS_FILE
  deadline, killed_after = time.time() + 300, None
  while time.time() < deadline and all(p.poll() is None for p in procs):
    steps = [r["step"] for r in workdir_lib.read_metrics(str(metrics)) if "train/loss" in r]
    if steps and steps[-1] >= 40:  # past checkpoints (every 8 steps), mid-way
      procs[1].send_signal(signal.SIGKILL)
      killed_after = steps[-1]
      break
    time.sleep(0.01)
  # Process 0 now waits on its dead peer's collectives; the scheduler stops it.
  procs[1].wait(timeout=60)
  time.sleep(2)
  procs[0].send_signal(signal.SIGKILL)
  for p in procs:
    p.communicate(timeout=60)
  assert killed_after is not None and procs[1].returncode == -signal.SIGKILL
  assert not (workdir / "final_eval.json").exists()

  _launch(TRAIN, workdir, 2, 2, *LONG)  # the same commands resume

  chex.assert_trees_all_equal(_checkpoint(workdir), _checkpoint(tmp_path / "uninterrupted"))
  steps = [r["step"] for r in workdir_lib.read_metrics(str(metrics)) if "train/loss" in r]
  assert steps == list(range(1, 129))
  assert (_record(workdir / "final_eval.json")["views"]
          == _record(tmp_path / "uninterrupted" / "final_eval.json")["views"])


def test_two_processes_evaluate_paths_as_one_process(tmp_path):
  for name, preset in (("cue", "cpu_cue"), ("nocue", "cpu_nocue")):
    tasks.run(train_config.get_config(f"{preset},quicktest"), str(tmp_path / name))
  ends = [f"--config.start_workdir={tmp_path / 'cue'}", f"--config.end_workdir={tmp_path / 'nocue'}"]
  config = fit_curve_config.get_config("cpu_clean,quicktest")
  config.start_workdir, config.end_workdir = str(tmp_path / "cue"), str(tmp_path / "nocue")
  config.num_epochs = 1
  tasks.run(config, str(tmp_path / "curve"))  # its loop is the train task's (tested above)

  curves = f"--config.curve_workdirs=('{tmp_path / 'curve'}',)"
  evaluate = "experiments/configs/eval_path.py:cpu,quicktest"
  num_t = "--config.path.num_t=4"  # 4 t on 4 devices: spread over t (the study spreads its 3
  _launch(evaluate, tmp_path / "eval_two", 2, 2, *ends, curves, num_t)  # over the data)
  _launch(evaluate, tmp_path / "eval_one", 1, 1, *ends, curves, num_t)
  two, one = (_record(tmp_path / name / "eval_path.json") for name in ("eval_two", "eval_one"))
  assert two["devices"] == 4 and two["path_eval_sharded_over"] == "t"
  _assert_close(two, one, atol=1e-5)


def test_two_processes_run_the_fine_tuning_study_as_one_process(tmp_path):
  study = "experiments/configs/reproduce.py:cpu,quicktest"
  one_seed = "--config.seeds=(0,)"  # every method once: the cue model, heads, FT, CBFT, paths
  _launch(study, tmp_path / "two", 2, 2, one_seed)
  _launch(study, tmp_path / "one", 1, 1, one_seed)
  two, one = (_record(tmp_path / name / "reproduce.json") for name in ("two", "one"))
  assert two["devices"] == 4 and one["devices"] == 1
  _assert_close(two["methods"], one["methods"])
  cbft = _record(tmp_path / "two" / "runs" / "cbft_seed0" / "result.json")
  assert cbft["path_to_cue_model"]["sharded_over"] == "data"  # 3 t on 4 devices
  # The cue model the study trains (the train task): the same numbers and parameters.
  cue = [_record(tmp_path / name / "cue_model" / "final_eval.json") for name in ("two", "one")]
  _assert_close(cue[0]["views"], cue[1]["views"])
  for a, b in zip(jax.tree.leaves(_checkpoint(tmp_path / "two" / "cue_model")["params"]),
                  jax.tree.leaves(_checkpoint(tmp_path / "one" / "cue_model")["params"])):
    np.testing.assert_allclose(a, b, atol=1e-4)  # the reduction order differs over 4 devices
  # The two processes leave what one process leaves (records written once, by process 0).
  for sub in ("", "cue_model", "runs"):
    assert sorted(os.listdir(tmp_path / "two" / sub)) == sorted(os.listdir(tmp_path / "one" / sub))
