"""Dry runs build, run one step and estimate, without data or files (mechconn.dry_run)."""

import json
import os

import pytest

from experiments.configs import fit_curve as fit_curve_config
from experiments.configs import reproduce as reproduce_config
from experiments.configs import train as train_config
from mechconn import dry_run
from mechconn import mesh as mesh_lib
from mechconn import tasks
from mechconn.tasks import specs
from mechconn.tasks import runner
from mechconn.tasks import train as train_task


def _unlocked(module, preset):
  config = module.get_config(preset)
  config.unlock()
  return config


def test_estimate_extrapolates_the_line_through_two_timings():
  # 0.1 s fixed + 0.01 s per example: 0.12 s at 2, 0.18 s at 8 -> 2.66 s at 256.
  timing = dry_run.StepTiming("step", compile_seconds=3.0, timed_batches=(2, 8),
                              step_seconds=(0.12, 0.18), global_batch=256, num_steps=1000)
  assert timing.seconds_per_step == pytest.approx(0.1 + 0.01 * 256)
  assert timing.estimate_seconds == pytest.approx(1000 * 2.66)
  flat = dry_run.StepTiming("step", 1.0, (2, 8), (0.2, 0.19), 256, 10)  # noise: no slope < 0
  assert flat.seconds_per_step == pytest.approx(0.2)
  one = dry_run.StepTiming("step", 1.0, (256,), (0.5,), 256, 10)  # the real batch
  assert one.estimate_seconds == pytest.approx(5.0)
  assert dry_run.timed_batch_sizes(256, 1, "cpu") == (2, 8)
  assert dry_run.timed_batch_sizes(256, 8, "cpu") == (16, 64)
  assert dry_run.timed_batch_sizes(256, 8, "gpu") == (256,)
  assert dry_run.timed_batch_sizes(4, 1, "cpu") == (2, 4)


@pytest.mark.slow  # builds and compiles a whole task's steps
def test_train_dry_run_reads_no_data_and_writes_nothing(tmp_path, capsys):
  config = _unlocked(train_config, "cpu_cue,quicktest")
  config.data.dataset, config.dry_run = "cifar100", True  # CIFAR is not on this machine
  record = tasks.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  out = capsys.readouterr().out
  assert "mesh {'data': 1}" in out and "estimate for the whole run" in out
  (step,) = record["steps"]
  num_steps = config.num_epochs * (512 // config.batch_size)  # quicktest: 512 examples
  assert step["num_steps"] == num_steps and step["timed_batches"] == [2, 8]
  assert step["global_batch"] == config.batch_size
  assert record["estimate_seconds"] == pytest.approx(
      num_steps * step["seconds_per_step"], abs=0.051)  # rounded to 0.1 s
  assert record["placement"]["batch"].startswith("2 arrays")


@pytest.mark.slow  # builds and compiles a whole task's steps
def test_dominoes_dry_run_uses_the_stacked_image_shape():
  config = _unlocked(train_config, "cpu_cue,quicktest")
  config.data.cue = "dominoes"
  assert specs.data_spec(config.data, "train").input_shape == (64, 32, 3)
  mesh = mesh_lib.data_mesh()
  spec = train_task.resolve(config, mesh.devices.size)
  state, timing, batch = runner.time_build(train_task.build(spec, mesh), mesh)
  assert batch["image"].shape == (8, 64, 32, 3) and int(state.step) == 8  # 4 calls x 2 sizes
  assert min(timing.step_seconds) > 0


@pytest.mark.slow  # builds and compiles a whole task's steps
def test_reproduce_dry_run_times_cue_naive_and_cbft_steps(capsys):
  config = _unlocked(reproduce_config, "cpu,quicktest")
  config.dry_run = True
  record = tasks.run(config, "/nonexistent/never/written")
  names = [s["name"] for s in record["steps"]]
  assert names == ["cue model step", "naive step", "lp_ft step", "cbft step"]  # lp, dfr: heads
  ft = config.finetune
  steps = ft.num_epochs * (ft.num_clean // ft.batch_size)
  train = config.train
  assert record["steps"][0]["num_steps"] == train.num_epochs * (512 // train.batch_size)
  for step in record["steps"][1:]:
    assert step["num_steps"] == len(config.seeds) * steps
  assert "DRY_RUN " in capsys.readouterr().out


@pytest.mark.slow  # builds and compiles a whole task's steps
def test_fit_curve_dry_run_before_the_end_points_exist(tmp_path):
  config = _unlocked(fit_curve_config, "cpu_cue,quicktest")
  config.start_workdir, config.end_workdir = str(tmp_path / "a"), str(tmp_path / "b")
  config.dry_run = True
  record = tasks.run(config, str(tmp_path / "curve"))
  assert "fresh inits" in record["dry_run"] and record["steps"][0]["name"] == "fit bezier"
  assert not os.listdir(tmp_path)


def test_unknown_dataset_is_named():
  config = _unlocked(train_config, "cpu_cue").data
  config.dataset = "imagenet"
  with pytest.raises(ValueError, match=r"config.data.dataset='imagenet' is not valid; valid "
                                       r"choices: \["):
    specs.data_spec(config, "train")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["train.py:cifar10_box80_vgg13",
                                    "eval_path.py:cifar100_box60_resnet18"])
def test_paper_preset_dry_run_through_the_launcher_on_two_devices(preset, tmp_path, launch):
  """Full-width paper models, tiny batches, a 2-device mesh; prints mesh and estimate."""
  proc = launch(f"--config=experiments/configs/{preset}", f"--workdir={tmp_path / 'w'}",
                "--config.dry_run=True",
                *(["--config.per_device_batch_size=96"] if preset.startswith("train") else []),
                env={"JAX_PLATFORMS": "cpu",
                     "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads([ln for ln in proc.stdout.splitlines()
                       if ln.startswith("DRY_RUN ")][-1][len("DRY_RUN "):])
  assert record["mesh"] == {"data": 2}
  (step,) = record["steps"]
  assert step["timed_batches"] == [4, 16]  # 2 and 8 per device
  if preset.startswith("train"):  # the batch follows the device count
    assert step["global_batch"] == 192 and step["per_device_batch"] == 96
    assert step["num_steps"] == 100 * (50_000 // 192)
  else:  # 4 paths x 11 t; a t is 1,024 BatchNorm examples and 4 views of 10,000
    assert step["num_steps"] == 44 and step["global_batch"] == (1024 + 40_000) // 4
  assert record["estimate_seconds"] > 0
  assert not (tmp_path / "w").exists()


def test_preset_sweep_lists_every_paper_preset_of_every_task():
  from experiments import dry_run_presets
  names = [name for name, _ in dry_run_presets.presets()]
  assert len(names) == len(set(names))
  for preset in train_config.paper_presets():
    assert f"train.py:{preset}" in names
  assert "fit_curve.py:cifar100_box90_resnet18_cue" in names
  assert "eval_path.py:cifar10_box60_vgg13" in names
  assert "reproduce.py:cifar10_dominoes80_resnet18" in names
  for name in ("train.py:recall_lm", "train.py:recall_lm_seed1", "eval_path.py:recall_lm",
               "eval_path.py:recall_lm,repair"):  # the language model's presets
    assert name in names
  for name, module in dry_run_presets.presets():  # each builds (locked, with dry_run)
    assert "dry_run" in module.get_config(name.split(":", 1)[1])


@pytest.mark.slow  # compiles four VGG13 steps
def test_embedded_paper_scale_study_dry_runs_with_the_paper_recipe():
  config = _unlocked(reproduce_config, "shapes10_paper_vgg13")
  assert config.train.model.kwargs.to_dict() == {"width": 1.0, "weight_init": "torch"}
  config.train.model.kwargs.width = 0.125  # the recipe's step counts at a fraction of the compile
  config.dry_run = True
  record = tasks.run(config, "/nonexistent/never/written")
  steps = {s["name"]: s for s in record["steps"]}
  assert steps["cue model step"]["num_steps"] == 100 * (50_000 // 256)  # the paper's 100 epochs
  assert steps["cue model step"]["global_batch"] == 256
  for method in ("naive", "lp_ft", "cbft"):  # official fine-tuning: 20 epochs of 2,500
    assert steps[f"{method} step"]["num_steps"] == 3 * 20 * (2500 // 256)
  assert "vgg13" in record["dry_run"] and record["estimate_seconds"] > 0
