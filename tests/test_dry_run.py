"""Dry runs build, run one step and estimate, without data or files (mechconn.dry_run)."""

import json
import os
import subprocess
import sys

import pytest

from mechconn import dry_run
from mechconn import mesh as mesh_lib
from mechconn import reproduce
from mechconn import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from experiments.configs import reproduce as reproduce_config  # noqa: E402
from experiments.configs import train as train_config  # noqa: E402


def _unlocked(module, preset):
  config = module.get_config(preset)
  config.unlock()
  return config


def test_estimate_is_steps_times_step_time_scaled_by_batch():
  timing = dry_run.StepTiming("step", compile_seconds=3.0, step_seconds=0.5, timed_batch=2,
                              global_batch=256, num_steps=1000)
  assert timing.estimate_seconds == pytest.approx(1000 * 0.5 * 256 / 2)
  assert dry_run.timed_batch_size(256, 1, "cpu") == 2
  assert dry_run.timed_batch_size(256, 8, "cpu") == 16
  assert dry_run.timed_batch_size(256, 8, "gpu") == 256
  assert dry_run.timed_batch_size(1, 1, "cpu") == 1


def test_train_dry_run_reads_no_data_and_writes_nothing(tmp_path, capsys):
  config = _unlocked(train_config, "cifar100_box80_vgg13,quicktest")  # CIFAR is not here
  config.dry_run = True
  record = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  out = capsys.readouterr().out
  assert "mesh {'data': 1}" in out and "estimate for the whole run" in out
  (step,) = record["steps"]
  num_steps = config.num_epochs * (512 // config.batch_size)  # quicktest: 512 examples
  assert step["num_steps"] == num_steps and step["timed_batch"] == 2
  assert step["global_batch"] == config.batch_size
  assert record["estimate_seconds"] == pytest.approx(
      num_steps * step["step_seconds"] * config.batch_size / 2, abs=0.051)  # rounded to 0.1 s
  assert record["placement"]["batch"].startswith("2 arrays")


def test_dominoes_dry_run_uses_the_stacked_image_shape():
  config = _unlocked(train_config, "cifar10_dominoes80_resnet18,quicktest")
  assert dry_run.image_shape(config.data) == (64, 32, 3)
  mesh = mesh_lib.data_mesh()
  _, state, batch, timing = train.dry_run_train_step(config, mesh)
  assert batch["image"].shape == (2, 64, 32, 3) and int(state.step) == 2
  assert timing.step_seconds > 0


def test_reproduce_dry_run_times_cue_naive_and_cbft_steps(capsys):
  config = _unlocked(reproduce_config, "cifar10_box80_vgg13,quicktest")
  config.dry_run = True
  record = reproduce.reproduce(config, "/nonexistent/never/written")
  names = [s["name"] for s in record["steps"]]
  assert names == ["cue model step", "naive / lp_ft step", "cbft step"]
  ft = config.finetune
  steps = ft.num_epochs * (ft.num_clean // ft.batch_size)
  assert record["steps"][1]["num_steps"] == 2 * len(config.seeds) * steps  # naive + lp_ft
  assert record["steps"][2]["num_steps"] == len(config.seeds) * steps
  assert "DRY_RUN " in capsys.readouterr().out


def test_unknown_dataset_is_named():
  config = _unlocked(train_config, "cpu_cue").data
  config.dataset = "imagenet"
  with pytest.raises(ValueError, match=r"Unknown dataset 'imagenet'; valid: \["):
    dry_run.num_train_examples(config)


@pytest.mark.parametrize("preset", ["train.py:cifar10_box80_vgg13",
                                    "train.py:cifar100_box60_resnet18"])
def test_paper_preset_dry_run_through_the_launcher_on_two_devices(preset, tmp_path):
  """Full-width paper models, tiny batch, a 2-device mesh; prints mesh and estimate."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main", f"--config=experiments/configs/{preset}",
       f"--workdir={tmp_path / 'w'}", "--config.dry_run=True"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads([ln for ln in proc.stdout.splitlines()
                       if ln.startswith("DRY_RUN ")][-1][len("DRY_RUN "):])
  assert record["mesh"] == {"data": 2}
  (step,) = record["steps"]
  assert step["global_batch"] == 256 and step["per_device_batch"] == 128
  assert step["timed_batch"] == 4 and step["timed_per_device_batch"] == 2
  assert step["num_steps"] == 100 * (50_000 // 256)
  assert record["estimate_seconds"] > 0
  assert not (tmp_path / "w").exists()

