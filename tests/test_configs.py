"""experiments/configs/train.py: presets build and validate; bad values fail early and clearly."""

import importlib.util
import os
import subprocess
import sys

import pytest

from mechconn import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs import each other as experiments.configs.*


def _load(name):
  spec = importlib.util.spec_from_file_location(
      f"config_{name}", os.path.join(REPO, "experiments", "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


train_configs = _load("train")


@pytest.mark.parametrize("preset", list(train_configs.CPU_PRESETS) + train_configs.paper_presets())
def test_every_preset_builds_locked_and_valid(preset):
  for name in (preset, f"{preset},quicktest"):
    config = train_configs.get_config(name)
    train.check_train_config(config, num_devices=8)
    with pytest.raises(AttributeError):
      config.not_a_field = 1  # locked: unknown keys are refused


def test_presets_carry_the_recipes():
  cue, nocue = train_configs.get_config("cpu_cue"), train_configs.get_config("cpu_nocue")
  assert (cue.data.dataset, cue.data.cue, cue.data.cue_proportion) == ("shapes10", "box", 0.8)
  assert nocue.data.cue_proportion == 0.0 and nocue.data.cue == "box"
  assert (cue.seed, nocue.seed) == (0, 1)  # independently initialised end points
  assert train_configs.get_config("cifar10_box0_vgg13").seed == 1
  paper = train_configs.get_config("cifar100_box90_resnet18")
  assert (paper.data.dataset, paper.data.cue, paper.data.cue_proportion) == ("cifar100", "box",
                                                                             0.9)
  assert paper.model.name == "resnet18" and paper.model.kwargs.width == 1.0
  opt = paper.optimizer
  assert (opt.learning_rate, opt.momentum, opt.weight_decay) == (0.1, 0.9, 1e-4)
  assert (opt.schedule, opt.decay_every_epochs, opt.decay_factor) == ("step", 40, 0.1)
  assert (paper.batch_size, paper.num_epochs) == (256, 100)
  dominoes = train_configs.get_config("cifar10_dominoes60_vgg13")
  assert (dominoes.data.cue, dominoes.data.simple_dataset) == ("dominoes", "fashion_mnist")
  quick = train_configs.get_config("cifar10_box80_vgg13,quicktest")
  assert quick.data.num_train == 512 and quick.model.kwargs.width == 0.0625


def test_unknown_presets_and_modifiers_list_the_valid_ones():
  with pytest.raises(ValueError, match=r"Unknown preset 'cifar10_box85_vgg13'.*cpu_cue"):
    train_configs.get_config("cifar10_box85_vgg13")
  with pytest.raises(ValueError, match=r"Unknown preset modifier 'fast'.*quicktest"):
    train_configs.get_config("cpu_cue,fast")


@pytest.mark.parametrize("key, value, message", [
    ("data.dataset", "cifar11", r"config.data.dataset='cifar11' is not valid; valid choices: "
                                r"\[.*'cifar10'.*'shapes10'"),
    ("data.cue", "patch", r"config.data.cue='patch'.*\['box', 'dominoes', 'none'\]"),
    ("data.cue_proportion", 1.5, r"config.data.cue_proportion=1.5 must be in \[0, 1\]"),
    ("data.cue_proportion", -0.1, r"cue_proportion=-0.1 must be in \[0, 1\]"),
    ("data.num_train", 0, r"config.data.num_train.*=0 must be a positive integer"),
    ("model.name", "vgg16", r"config.model.name='vgg16'.*'resnet18', 'small_cnn', 'vgg13'"),
    ("optimizer.schedule", "linear", r"optimizer.schedule='linear'.*'constant', 'cosine'"),
    ("optimizer.learning_rate", 0.0, r"learning_rate=0.0 must be > 0"),
    ("batch_size", 100, r"config.batch_size=100 is not divisible by the 8 devices"),
    ("eval_batch_size", 508, r"eval_batch_size=508 is not divisible by the 8 devices"),
    ("eval_every_steps", -1, r"eval_every_steps=-1 must be a non-negative integer"),
    ("optimizer.momentum", -3.0, r"config.optimizer.momentum=-3.0 must be in \[0, 1\)"),
    ("optimizer.momentum", 1.0, r"config.optimizer.momentum=1.0 must be in \[0, 1\)"),
    ("optimizer.weight_decay", -5.0, r"config.optimizer.weight_decay=-5.0 must be >= 0"),
    ("optimizer.learning_rate", float("nan"), r"learning_rate=nan must be a finite number"),
    ("optimizer.learning_rate", float("inf"), r"learning_rate=inf must be a finite number"),
    ("optimizer.learning_rate", -0.1, r"learning_rate=-0.1 must be > 0"),
    ("optimizer.decay_factor", 0.0, r"decay_factor=0.0 must be in \(0, 1\]"),
    ("data.cue_proportion", float("nan"), r"cue_proportion=nan must be a finite number"),
    ("seed", -1, r"config.seed=-1 must be a non-negative integer"),
    ("data.seed", -2, r"config.data.seed=-2 must be a non-negative integer"),
    ("data.num_train", 100, r"config.batch_size=128 exceeds the 100 training examples"),
    ("data.num_train", 10_000_000, r"config.data.num_train=10000000 exceeds the 50000 "
                                   r"examples of shapes10's split"),
    ("data.num_test", 20_000, r"config.data.num_test=20000 exceeds the 10000 examples"),
])
def test_invalid_values_name_the_key_and_the_valid_choices(key, value, message):
  config = train_configs.get_config("cpu_cue")
  section, _, field = key.rpartition(".")
  (config[section] if section else config)[field] = value
  with pytest.raises(ValueError, match=message):
    train.check_train_config(config, num_devices=8)


def test_unknown_model_attribute_is_named():
  config = train_configs.get_config("cpu_cue")
  with config.unlocked():
    config.model.kwargs.depth = 3
  with pytest.raises(ValueError, match=r"config.model.kwargs has \['depth'\].*valid: .*'width'"):
    train.check_train_config(config, num_devices=1)


def test_invalid_config_fails_before_any_work(tmp_path):
  config = train_configs.get_config("cpu_cue")
  config.data.dataset = "imagenet"
  with pytest.raises(ValueError, match="data.dataset"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_launcher_refuses_unknown_keys(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=experiments/configs/train.py:cpu_cue,quicktest", f"--workdir={tmp_path}",
       "--config.data.cue_proportin=0.5"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "cue_proportin" in proc.stderr
  assert not os.listdir(tmp_path)


fit_curve_configs = _load("fit_curve")
eval_path_configs = _load("eval_path")
PAPER_BASES = [p for p in train_configs.paper_presets() if "_box" in p and "_box0_" not in p]


@pytest.mark.parametrize("base", ["cpu"] + PAPER_BASES)
def test_connectivity_presets_build_and_validate(base):
  from mechconn import connectivity
  for fit_on in ("clean", "cue"):
    for modifiers in ("", ",quicktest"):
      config = fit_curve_configs.get_config(f"{base}_{fit_on}{modifiers}")
      connectivity.check_curve_config(config, num_devices=8)
      assert config.data.cue_proportion == {"clean": 0.0, "cue": 1.0}[fit_on]
  config = eval_path_configs.get_config(base)
  connectivity.check_eval_path_config(config, num_devices=8)
  start, end = config.start_workdir, config.end_workdir
  if base == "cpu":
    assert (start, end) == ("workdir/cpu_cue", "workdir/cpu_nocue")
  else:
    dataset, _, _, model = train_configs.parse_paper_preset(base)
    assert (start, end) == (f"workdir/{base}", f"workdir/{dataset}_box0_{model}")


def test_paper_curve_recipe():
  paper = fit_curve_configs.get_config(f"{PAPER_BASES[0]}_clean")
  assert (paper.num_epochs, paper.batch_size, paper.optimizer.learning_rate,
          paper.optimizer.decay_every_epochs) == (15, 128, 0.1, 10)


def test_connectivity_config_errors_name_the_key():
  from mechconn import connectivity
  config = eval_path_configs.get_config("cpu")
  config.align = "procrustes"
  with pytest.raises(ValueError, match=r"config.align='procrustes'.*'activation', 'none'"):
    connectivity.check_eval_path_config(config, 1)
  config = eval_path_configs.get_config("cpu")
  config.num_t = 1
  with pytest.raises(ValueError, match="num_t=1 must be at least 2"):
    connectivity.check_eval_path_config(config, 1)
  config = fit_curve_configs.get_config("cpu_clean")
  config.curve.kind = "spline"
  with pytest.raises(ValueError, match=r"config.curve.kind='spline'.*'bezier', 'polychain'"):
    connectivity.check_curve_config(config, 1)
  with pytest.raises(ValueError, match="must end in _clean or _cue|valid presets"):
    fit_curve_configs.get_config("cpu")


reproduce_configs = _load("reproduce")
finetune_configs = _load("finetune")


@pytest.mark.parametrize("preset", ["cpu"] + [p for p in train_configs.paper_presets()
                                              if "0_" in p and "_box0_" not in p
                                              and "dominoes0_" not in p])
def test_reproduce_presets_build_and_validate(preset):
  from mechconn import reproduce
  for name in (preset, f"{preset},quicktest"):
    config = reproduce_configs.get_config(name)
    train.check_train_config(config.train, num_devices=8)
    reproduce.check_finetune_config(config, num_devices=8)
  if preset != "cpu":
    ft = reproduce_configs.get_config(preset).finetune
    assert (ft.optimizer.learning_rate, ft.batch_size, ft.num_epochs, ft.num_clean,
            ft.num_cue) == (0.01, 256, 20, 2500, 47500)
    assert (ft.cbft.margin, ft.cbft.invariance_weight, ft.cbft.warmup_epochs) == (1.0, 1.0, 1)
    assert ft.naive.learning_rate == 0.01  # the official naive FT
  else:
    assert reproduce_configs.get_config(preset).finetune.naive.learning_rate == 0.001


def test_naive_learning_rate_must_be_positive():
  from mechconn import reproduce
  config = reproduce_configs.get_config("cpu")
  config.unlock()
  config.finetune.naive.learning_rate = 0.0
  with pytest.raises(ValueError, match=r"finetune.naive.learning_rate=0.0 must be > 0"):
    reproduce.check_finetune_config(config, num_devices=1)


def test_finetune_presets_are_the_methods():
  from mechconn import finetune, reproduce
  for method in finetune.METHODS:
    config = finetune_configs.get_config(f"{method},quicktest")
    assert config.method == method and tuple(config.finetune.methods) == (method,)
    reproduce.check_finetune_config(config, num_devices=8)


def test_a_refused_launch_writes_nothing(tmp_path):
  # Batch larger than the data: refused before the workdir is claimed, so the
  # corrected command is not then refused as "a different config".
  config = train_configs.get_config("cpu_cue,quicktest")
  config.data.num_train = 16
  with pytest.raises(ValueError, match=r"config.batch_size=32 exceeds the 16 training"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_task_configs_range_check_their_own_numbers():
  from mechconn import connectivity, drivers, reproduce
  quickstart = _load("quickstart")
  config = quickstart.get_config("quicktest")
  config.learning_rate = -0.05  # was: gradient ascent, and a result written
  with pytest.raises(ValueError, match=r"config.learning_rate=-0.05 must be > 0"):
    drivers.check_quickstart_config(config)
  config = quickstart.get_config("quicktest")
  config.bn_batches = 100
  with pytest.raises(ValueError, match=r"config.bn_batches=100 batches .* need 12800"):
    drivers.check_quickstart_config(config)
  config = eval_path_configs.get_config("cpu")
  config.barrier_tolerance = float("nan")
  with pytest.raises(ValueError, match=r"config.barrier_tolerance=nan must be a finite number"):
    connectivity.check_eval_path_config(config, 1)
  config = fit_curve_configs.get_config("cpu_clean")
  config.optimizer.momentum = -1.0
  with pytest.raises(ValueError, match=r"config.optimizer.momentum=-1.0 must be in \[0, 1\)"):
    connectivity.check_curve_config(config, 1)
  config = reproduce_configs.get_config("cpu")
  config.finetune.optimizer.weight_decay = -5.0
  with pytest.raises(ValueError, match=r"config.finetune.optimizer.weight_decay=-5.0 must be >= 0"):
    reproduce.check_study_config(config, 1)
  config = reproduce_configs.get_config("cpu")
  config.finetune.cbft.margin = float("inf")
  with pytest.raises(ValueError, match=r"config.finetune.cbft.margin=inf must be a finite"):
    reproduce.check_study_config(config, 1)
  config = reproduce_configs.get_config("cpu")
  config.seeds = (0, 0)
  with pytest.raises(ValueError, match=r"config.seeds=\(0, 0\) repeats a seed"):
    reproduce.check_study_config(config, 1)
