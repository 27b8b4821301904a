"""Two processes on this machine (gloo collectives on CPU): the multi-host code, for real.

Each process owns 2 fake CPU devices, loads only its rows of every batch, and
the job's mesh spans the 4 devices of both; checkpoints and records come from
the processes as on a pod slice. This is the rehearsal for a TPU pod slice:

  XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo python -m experiments.main \\
      --config=... --workdir=W --coordinator_address=localhost:PORT \\
      --num_processes=2 --process_id=I          # once per process, I = 0, 1
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from mechconn import checkpoint
from mechconn import loop

pytestmark = pytest.mark.slow  # launches several training processes
CONFIG = "experiments/configs/train.py:cpu_cue,quicktest"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, num_processes: int, devices_per_process: int, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  command = [sys.executable, "-m", "experiments.main", f"--config={CONFIG}",
             f"--workdir={workdir}", *extra]
  if num_processes > 1:
    port = _free_port()
    procs = [subprocess.Popen(command + [f"--coordinator_address=localhost:{port}",
                                         f"--num_processes={num_processes}",
                                         f"--process_id={i}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i in range(num_processes)]
  else:
    procs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)]
  outputs = [p.communicate(timeout=400) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return outputs


def test_two_processes_train_what_one_process_trains(tmp_path):
  _launch(tmp_path / "two", 2, 2)
  _launch(tmp_path / "one", 1, 1)
  records = {}
  for name in ("two", "one"):
    with open(tmp_path / name / "final_eval.json") as f:
      records[name] = json.load(f)
    with checkpoint.Checkpointer(str(tmp_path / name / loop.CHECKPOINT_DIR)) as ckpt:
      records[name + " params"] = ckpt.read()["params"]
  assert records["two"]["devices"] == 4 and records["one"]["devices"] == 1
  for view, r in records["one"]["views"].items():
    assert records["two"]["views"][view]["loss"] == pytest.approx(r["loss"], abs=1e-4)
    assert records["two"]["views"][view]["accuracy"] == pytest.approx(r["accuracy"], abs=0.006)
  for a, b in zip(jax.tree.leaves(records["two params"]), jax.tree.leaves(records["one params"])):
    np.testing.assert_allclose(a, b, atol=1e-4)  # the reduction order differs over 4 devices
  # The two processes leave what one process leaves (records written once, by process 0).
  assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
