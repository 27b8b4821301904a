"""experiments/configs: presets build and validate; bad values fail early and clearly."""

import dataclasses
import os

import numpy as np
import pytest

from experiments.configs import common
from experiments.configs import eval_path as eval_path_configs
from experiments.configs import finetune as finetune_configs
from experiments.configs import fit_curve as fit_curve_configs
from experiments.configs import quickstart as quickstart_configs
from experiments.configs import reproduce as reproduce_configs
from experiments.configs import train as train_configs
from mechconn import finetune
from mechconn import tasks
from mechconn import workdir as workdir_lib
from mechconn.tasks import methods
from mechconn.tasks import optim
from mechconn.tasks import records
from mechconn.tasks import specs
from mechconn.tasks import eval_path as eval_path_task
from mechconn.tasks import finetune as finetune_task
from mechconn.tasks import fit_curve as fit_curve_task
from mechconn.tasks import quickstart as quickstart_task
from mechconn.tasks import reproduce as reproduce_task
from mechconn.tasks import train as train_task


def test_parse_preset_splits_name_and_modifiers():
  assert common.parse_preset(None, "cpu", ("quicktest",)) == ("cpu", [])
  assert common.parse_preset("cpu_cue,quicktest", "cpu", ("quicktest",)) == (
      "cpu_cue", ["quicktest"])
  with pytest.raises(ValueError, match=r"Unknown preset modifier 'fast'; valid modifiers: "
                                       r"\['quicktest'\]"):
    common.parse_preset("cpu,fast", "cpu", ("quicktest",))


@pytest.mark.parametrize("module, default", [
    (train_configs, "cpu_cue"), (fit_curve_configs, "cpu_clean"), (eval_path_configs, "cpu"),
    (reproduce_configs, "cpu"), (finetune_configs, "naive"), (quickstart_configs, "quicktest")])
def test_every_config_file_refuses_an_unknown_modifier(module, default):
  module.get_config(default)
  with pytest.raises(ValueError, match=r"Unknown preset modifier 'fast'"):
    module.get_config(f"{default},fast")


def test_one_vocabulary_for_path_points_and_batchnorm_examples():
  for config in (eval_path_configs.get_config("cpu"), reproduce_configs.get_config("cpu"),
                 quickstart_configs.get_config("default")):
    assert set(config.path) >= {"num_t", "bn_examples"}
    assert "num_t" not in config and "bn_batches" not in config and "bn" not in config
  assert "path" not in finetune_configs.get_config("cbft")  # it evaluates no path
  assert quickstart_configs.get_config("default").path.bn_examples == 1024  # 8 x 128


@pytest.mark.parametrize("preset", list(train_configs.CPU_PRESETS) + train_configs.paper_presets())
def test_every_preset_builds_locked_and_valid(preset):
  for name in (preset, f"{preset},quicktest"):
    config = train_configs.get_config(name)
    train_task.resolve(config, num_devices=8)
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
    ("data.test_cue_proportion", 1.2, r"config.data.test_cue_proportion=1.2 must be in \[0, 1\]"),
    ("data.num_train", 0, r"config.data.num_train.*=0 must be a positive integer"),
    ("model.name", "vgg16", r"config.model.name='vgg16'.*'resnet18', 'resnet20', 'small_cnn', 'vgg13'"),
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
    train_task.resolve(config, num_devices=8)


def test_model_attribute_choices_are_checked_before_any_work():
  config = train_configs.get_config("cifar10_box80_vgg13")
  assert config.model.kwargs.weight_init == "torch"  # the paper presets: PyTorch's init
  config.model.kwargs.weight_init = "xavier"
  with pytest.raises(ValueError, match=r"config.model.kwargs.weight_init='xavier' is not valid; "
                                       r"valid choices: \['default', 'torch'\]"):
    train_task.resolve(config, num_devices=1)


def test_unknown_model_attribute_is_named():
  config = train_configs.get_config("cpu_cue")
  with config.unlocked():
    config.model.kwargs.depth = 3
  with pytest.raises(ValueError, match=r"config.model.kwargs has \['depth'\].*valid: .*'width'"):
    train_task.resolve(config, num_devices=1)


def test_invalid_config_fails_before_any_work(tmp_path):
  config = train_configs.get_config("cpu_cue")
  config.data.dataset = "imagenet"
  with pytest.raises(ValueError, match="data.dataset"):
    tasks.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_launcher_refuses_unknown_keys(tmp_path, launch):
  proc = launch("--config=experiments/configs/train.py:cpu_cue,quicktest",
                f"--workdir={tmp_path}", "--config.data.cue_proportin=0.5", timeout=120)
  assert proc.returncode != 0
  assert "cue_proportin" in proc.stderr
  assert not os.listdir(tmp_path)


PAPER_BASES = [p for p in train_configs.paper_presets() if "_box" in p and "_box0_" not in p]


@pytest.mark.parametrize("base", ["cpu"] + PAPER_BASES)
def test_connectivity_presets_build_and_validate(base):
  for fit_on in ("clean", "cue"):
    for modifiers in ("", ",quicktest"):
      config = fit_curve_configs.get_config(f"{base}_{fit_on}{modifiers}")
      fit_curve_task.resolve(config, num_devices=8)
      assert config.data.cue_proportion == {"clean": 0.0, "cue": 1.0}[fit_on]
  config = eval_path_configs.get_config(base)
  eval_path_task.resolve(config, num_devices=8)
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
  config = eval_path_configs.get_config("cpu")
  config.align = "procrustes"
  with pytest.raises(ValueError, match=r"config.align='procrustes'.*'activation', 'none'"):
    eval_path_task.resolve(config, 1)
  config = eval_path_configs.get_config("cpu")
  config.activation_sites = "post_gelu"
  with pytest.raises(ValueError, match=r"config.activation_sites='post_gelu'.*'module_outputs'"):
    eval_path_task.resolve(config, 1)
  config = eval_path_configs.get_config("cpu")
  config.path.num_t = 1
  with pytest.raises(ValueError, match="config.path.num_t=1 must be at least 2"):
    eval_path_task.resolve(config, 1)
  config = eval_path_configs.get_config("cpu")
  config.path.bn_variance = "sample"
  with pytest.raises(ValueError, match=r"config.path.bn_variance='sample'.*'biased', 'unbiased'"):
    eval_path_task.resolve(config, 1)
  config.path.bn_variance = "unbiased"
  assert specs.path_spec(config.path).renormalize == "batchnorm_unbiased"
  reproduce = reproduce_configs.get_config("cpu")
  assert specs.path_spec(reproduce.path).renormalize == "auto"  # biased, the default
  reproduce.path.bn_variance = "unbiased"
  resolved = reproduce_task.resolve(reproduce, num_devices=1)  # SmallCNN has BatchNorm
  assert resolved.path.renormalize == "batchnorm_unbiased"
  with reproduce.train.unlocked():
    reproduce.train.model = common.model_section("mlp", hidden=(8,))
  with pytest.raises(ValueError, match=r"bn_variance='unbiased' but MLP has no BatchNorm"):
    reproduce_task.resolve(reproduce, num_devices=1)
  config = fit_curve_configs.get_config("cpu_clean")
  config.curve.kind = "spline"
  with pytest.raises(ValueError, match=r"config.curve.kind='spline'.*'bezier', 'polychain'"):
    fit_curve_task.resolve(config, 1)
  with pytest.raises(ValueError, match="must end in _clean or _cue|valid presets"):
    fit_curve_configs.get_config("cpu")




@pytest.mark.parametrize("preset", ["cpu"] + [p for p in train_configs.paper_presets()
                                              if "0_" in p and "_box0_" not in p
                                              and "dominoes0_" not in p])
def test_reproduce_presets_build_and_validate(preset):
  for name in (preset, f"{preset},quicktest"):
    config = reproduce_configs.get_config(name)
    train_task.resolve(config.train, num_devices=8)
    reproduce_task.resolve(config, num_devices=8)
  if preset != "cpu":
    ft = reproduce_configs.get_config(preset).finetune
    assert (ft.optimizer.learning_rate, ft.batch_size, ft.num_epochs, ft.num_clean,
            ft.num_cue) == (0.01, 256, 20, 2500, 47500)
    assert (ft.cbft.margin, ft.cbft.invariance_weight, ft.cbft.warmup_epochs) == (1.0, 1.0, 1)
    assert ft.naive.learning_rate == 0.01  # the official naive FT
  else:
    assert reproduce_configs.get_config(preset).finetune.naive.learning_rate == 0.001


def test_naive_learning_rate_must_be_positive():
  config = reproduce_configs.get_config("cpu")
  config.unlock()
  config.finetune.naive.learning_rate = 0.0
  with pytest.raises(ValueError, match=r"finetune.naive.learning_rate=0.0 must be > 0"):
    reproduce_task.resolve(config, num_devices=1)


def test_finetune_presets_are_the_methods():
  for method in finetune.METHODS:
    config = finetune_configs.get_config(f"{method},quicktest")
    assert config.method == method and tuple(config.finetune.methods) == (method,)
    assert finetune_task.resolve(config, num_devices=8).finetune.methods == (method,)


def test_a_refused_launch_writes_nothing(tmp_path):
  # Batch larger than the data: refused before the workdir is claimed, so the
  # corrected command is not then refused as "a different config".
  config = train_configs.get_config("cpu_cue,quicktest")
  config.data.num_train = 16
  with pytest.raises(ValueError, match=r"config.batch_size=32 exceeds the 16 training"):
    tasks.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_task_configs_range_check_their_own_numbers():
  config = quickstart_configs.get_config("quicktest")
  config.optimizer.learning_rate = -0.05  # was: gradient ascent, and a result written
  with pytest.raises(ValueError, match=r"config.optimizer.learning_rate=-0.05 must be > 0"):
    quickstart_task.resolve(config, 1)
  config = eval_path_configs.get_config("cpu")
  config.barrier_tolerance = float("nan")
  with pytest.raises(ValueError, match=r"config.barrier_tolerance=nan must be a finite number"):
    eval_path_task.resolve(config, 1)
  config = fit_curve_configs.get_config("cpu_clean")
  config.optimizer.momentum = -1.0
  with pytest.raises(ValueError, match=r"config.optimizer.momentum=-1.0 must be in \[0, 1\)"):
    fit_curve_task.resolve(config, 1)
  config = reproduce_configs.get_config("cpu")
  config.finetune.optimizer.weight_decay = -5.0
  with pytest.raises(ValueError, match=r"config.finetune.optimizer.weight_decay=-5.0 must be >= 0"):
    reproduce_task.resolve(config, 1)
  config = reproduce_configs.get_config("cpu")
  config.finetune.cbft.margin = float("inf")
  with pytest.raises(ValueError, match=r"config.finetune.cbft.margin=inf must be a finite"):
    reproduce_task.resolve(config, 1)
  config = reproduce_configs.get_config("cpu")
  config.seeds = (0, 0)
  with pytest.raises(ValueError, match=r"config.seeds=\(0, 0\) repeats a seed"):
    reproduce_task.resolve(config, 1)


def test_test_cue_proportion_reaches_the_views():
  """data.test_cue_proportion (the official script's test loaders) is what the tasks' views
  use; 1 (the default) keeps every view fully cued."""
  from mechconn.data import pipeline
  from mechconn.tasks import data as task_data
  config = train_configs.get_config("cpu_cue")
  config.data.num_test = 200
  full, labels = task_data.load_test_views(specs.data_spec(config.data, "train"))
  config.data.test_cue_proportion = 0.5
  half, _ = task_data.load_test_views(specs.data_spec(config.data, "train"))
  expected, _ = pipeline.load_test_views("shapes10", "box", num_examples=200,
                                         cue_proportion=0.5)
  for name in full:
    np.testing.assert_array_equal(half[name], expected[name])
  assert not np.array_equal(half["cue"], full["cue"])
  np.testing.assert_array_equal(half["clean"], full["clean"])


def test_cbft_iterations_share_one_learning_rate():
  """Both optimiser updates of a CBFT iteration run at the iteration's rate (the official
  scheduler steps once per iteration); 'update' keeps the earlier per-update schedule."""
  import jax.numpy as jnp
  opt = common.optimizer_section(0.1, momentum=0.0, weight_decay=0.0)  # cosine to 0
  tx, schedule = optim.make_optimizer(specs.optimizer_spec(opt), num_steps=10,
                                      steps_per_epoch=5, updates_per_step=2)
  params, state = jnp.zeros(()), tx.init(jnp.zeros(()))
  deltas = []
  for _ in range(20):
    updates, state = tx.update(jnp.ones(()), state, params)
    deltas.append(-float(updates))
  np.testing.assert_allclose(deltas, [float(schedule(i // 2)) for i in range(20)], rtol=1e-6)
  assert deltas[-1] > 0  # the last iteration still learns (per update it would be at 0)
  config = reproduce_configs.get_config("cpu")
  cbft = reproduce_task.resolve(config, 1).finetune.cbft
  assert cbft.schedule_per == "iteration" and methods.cbft_schedule(cbft, 5) == (2, 0)
  no_barrier = dataclasses.replace(cbft, barrier_loss=False)  # one update: nothing to share
  assert methods.cbft_schedule(no_barrier, 5) == (1, 0)
  assert methods.cbft_schedule(dataclasses.replace(cbft, schedule_per="update"), 5) == (1, 0)
  config.finetune.cbft.schedule_per = "epoch"
  with pytest.raises(ValueError, match=r"finetune.cbft.schedule_per='epoch'.*'iteration'"):
    reproduce_task.resolve(config, 1)
  # A run recorded before the field existed advanced per update; a config without the field
  # is not a config (no default below the boundary).
  recorded = workdir_lib.config_to_dict(reproduce_configs.get_config("cpu"))
  del recorded["finetune"]["cbft"]["schedule_per"]
  assert records.upgrade(recorded)["finetune"]["cbft"]["schedule_per"] == "update"
  with config.unlocked():
    del config.finetune.cbft.schedule_per
  with pytest.raises(AttributeError, match="schedule_per"):
    reproduce_task.resolve(config, 1)


def _official_cbft_rates(base, num_epochs, iters, warmup_epochs):
  """The learning rate of every iteration of the official CBFT loop: utils.LR_Scheduler
  (cosine to 0 over every iteration), stepped after each iteration of epochs > warmup."""
  schedule = 0.5 * base * (1 + np.cos(np.pi * np.arange(num_epochs * iters) / (num_epochs * iters)))
  lr, stepped, rates = base, 0, []
  for epoch in range(num_epochs):
    for _ in range(iters):
      rates.append(lr)
      if epoch > warmup_epochs:
        lr, stepped = schedule[stepped], stepped + 1
  return rates


@pytest.mark.parametrize("warmup_epochs", [0, 1, 2])
def test_cbft_schedule_after_warmup_is_the_official_scripts(warmup_epochs):
  """'iteration_after_warmup': both updates of every iteration at the rate the official loop
  gives that iteration (its scheduler stepped only from epoch warmup_epochs + 1)."""
  import jax.numpy as jnp
  cbft = methods.CBFTSpec(margin=1.0, invariance_weight=1.0, warmup_epochs=warmup_epochs,
                          t_distribution="clip", barrier_loss=True,
                          schedule_per="iteration_after_warmup", cue_set="all_cued")
  shared, held = methods.cbft_schedule(cbft, 4)
  opt = common.optimizer_section(0.1, momentum=0.0, weight_decay=0.0)  # cosine to 0
  tx, schedule = optim.make_optimizer(specs.optimizer_spec(opt), num_steps=20,
                                      steps_per_epoch=4, updates_per_step=shared,
                                      hold_steps=held)
  params, state = jnp.zeros(()), tx.init(jnp.zeros(()))
  deltas = []
  for _ in range(2 * 20):
    updates, state = tx.update(jnp.ones(()), state, params)
    deltas.append(-float(updates))
  expected = _official_cbft_rates(0.1, num_epochs=5, iters=4, warmup_epochs=warmup_epochs)
  np.testing.assert_allclose(deltas[::2], expected, rtol=1e-6)
  np.testing.assert_allclose(deltas[1::2], expected, rtol=1e-6)
  np.testing.assert_allclose([float(schedule(i)) for i in range(20)], expected, rtol=1e-6)
  assert expected[-1] > 0.0 and expected[4 * (warmup_epochs + 1)] == 0.1
