"""mechconn.tasks.sequences: the language-model case of the train and eval_path tasks.

The sequence data against its definition (splits, stacking), the checks that
name the field, and end to end: two quicktest language models trained by the
train task (resumable), and eval_path between them, its ends equal to what the
train runs recorded.
"""

import json
import os
import shutil

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import eval_path as eval_path_configs
from experiments.configs import finetune as finetune_configs
from experiments.configs import fit_curve as fit_curve_configs
from experiments.configs import train as train_configs
from mechconn import checkpoint
from mechconn import loop
from mechconn import mesh as mesh_lib
from mechconn import tasks
from mechconn.data import batching
from mechconn.data import sequences
from mechconn.data import steps as data_steps
from mechconn.models import CausalLM
from mechconn.tasks import optim
from mechconn.tasks import specs
from mechconn.tasks import eval_path as eval_path_task
from mechconn.tasks import fit_curve as fit_curve_task
from mechconn.tasks import runs
from mechconn.tasks import sequences as task_sequences
from mechconn.tasks import train as train_task

SEEDS = train_configs.LM_PRESETS  # the two end points: seed 0 and seed 1


def _data(**overrides):
  data = train_configs.get_config("recall_lm,quicktest").data
  with data.unlocked():
    data.update(overrides)
  return data


def test_train_and_test_sequences_are_distinct_and_deterministic():
  data = _data(num_train=64, num_test=64)
  train, test = (task_sequences.load_split(data, s) for s in ("train", "test"))
  again = task_sequences.load_split(data, "train")
  np.testing.assert_array_equal(train.tokens, again.tokens)
  np.testing.assert_array_equal(  # the embedded images' rule: seed 2 * data.seed + split
      test.tokens, sequences.recall_sequences(64, seed=1)["tokens"])
  assert not np.array_equal(train.tokens, test.tokens)
  assert len(train) == 64 and set(train.examples(np.arange(3))) == {"tokens", "mask"}
  np.testing.assert_array_equal(task_sequences.load_split(data, "train", 10).mask,
                                train.mask[:10])


def test_stacked_sequences_pad_with_rows_that_have_no_targets():
  split = task_sequences.load_split(_data(num_test=10), "test")
  stacked = task_sequences.stack(split, 4)
  assert stacked["tokens"].shape == (3, 4, sequences.SEQ_LEN)
  np.testing.assert_array_equal(stacked["tokens"].reshape(12, -1)[:10], split.tokens)
  assert not stacked["mask"].reshape(12, -1)[10:].any()  # the padding weighs nothing
  full = task_sequences.stack(split, 4, drop_remainder=True)
  assert full["mask"].shape == (2, 4, sequences.SEQ_LEN)
  batches = task_sequences.statistics_batches(_data(), 8, 4)
  assert set(batches) == {"tokens"} and batches["tokens"].shape == (2, 4, sequences.SEQ_LEN)


def test_sequences_run_on_the_host_pipeline():
  split = task_sequences.load_split(_data(num_train=64), "train")
  assert not data_steps.on_device(split, "auto") and not data_steps.on_device(split, "host")
  with pytest.raises(ValueError, match="device pipeline draws cued image batches"):
    data_steps.on_device(split, "device")
  batches = data_steps.StepBatches(split, 16, mesh_lib.data_mesh())
  batch = batches(3, 5)
  idx = batching.batch_indices_at_step(64, 16, seed=3, step=5)
  np.testing.assert_array_equal(batch["tokens"], split.tokens[idx])


def test_the_presets_are_two_seeds_of_one_recipe():
  a, b = (train_configs.get_config(p) for p in SEEDS)
  assert (a.seed, b.seed) == (0, 1)
  a.seed = 1
  assert a.to_dict() == b.to_dict()
  assert (a.model.name, a.data.dataset, a.optimizer.name) == ("causal_lm", "recall", "adamw")
  for preset in SEEDS + tuple(f"{p},quicktest" for p in SEEDS):
    train_task.resolve(train_configs.get_config(preset), num_devices=8)
  quick = train_configs.get_config("recall_lm,quicktest")
  assert quick.optimizer.warmup_steps < 32 and quick.model.kwargs.width == 8
  ev = eval_path_configs.get_config("recall_lm")
  assert (ev.start_workdir, ev.end_workdir) == ("workdir/recall_lm", "workdir/recall_lm_seed1")
  assert ev.data.to_dict() == a.data.to_dict()  # the train runs' held-out set
  assert ev.path.renormalize == "none"
  assert eval_path_configs.get_config("recall_lm,repair").path.renormalize == "repair"
  for preset in ("recall_lm", "recall_lm,repair", "recall_lm,quicktest"):
    eval_path_task.resolve(eval_path_configs.get_config(preset), num_devices=8)
  with pytest.raises(ValueError, match="'repair' modifier is for 'recall_lm'"):
    eval_path_configs.get_config("cpu,repair")


@pytest.mark.parametrize("key, value, message", [
    ("data.pipeline", "device", r"config.data.pipeline='device' is not valid; valid choices: "
                                r"\['auto', 'host'\]"),
    ("data.num_train", -1, r"config.data.num_train=-1 must be a positive integer"),
    ("model.name", "small_cnn", r"config.model.name='small_cnn' is not valid; valid choices: "
                                r"\['causal_lm'\]"),
    ("model.kwargs.max_len", 40, r"config.model.kwargs has \['max_len'\], not attributes of "
                                 r"causal_lm"),
    ("optimizer.name", "adam", r"config.optimizer.name='adam'.*\['adamw', 'sgd'\]"),
    ("optimizer.warmup_steps", 1500, r"config.optimizer.warmup_steps=1500 must be fewer than "
                                     r"the run's 1500 steps"),
])
def test_invalid_language_model_configs_name_the_key(key, value, message):
  config = train_configs.get_config("recall_lm")
  section, _, field = key.rpartition(".")
  with config.unlocked():
    (config[section] if section else config)[field] = value
  with pytest.raises(ValueError, match=message):
    train_task.resolve(config, num_devices=1)


def test_tasks_without_a_language_model_case_refuse_sequence_data():
  config = fit_curve_configs.get_config("cpu_clean")
  config.data.dataset = "recall"
  with pytest.raises(ValueError, match=r"'recall' is a sequence dataset; the fit_curve task "
                                       r"takes image datasets only"):
    fit_curve_task.resolve(config, num_devices=1)
  config = eval_path_configs.get_config("recall_lm")
  config.align = "activation"
  with pytest.raises(ValueError, match=r"config.align='activation'.*\['none', 'weight'\]"):
    eval_path_task.resolve(config, num_devices=1)


def test_adamw_takes_momentum_as_b1_and_warms_up():
  opt = train_configs.get_config("recall_lm").optimizer
  tx, schedule = optim.make_optimizer(specs.optimizer_spec(opt), num_steps=1500,
                                      steps_per_epoch=1500)
  assert float(schedule(0)) == 0.0 and float(schedule(100)) == pytest.approx(3e-3)
  params, grads = {"w": jnp.ones(2)}, {"w": jnp.asarray([0.5, -0.02])}
  state = tx.init(params)
  for _ in range(51):  # Adam's step is lr * m / sqrt(v): about lr * sign(g) here, unlike SGD
    updates, state = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["w"], -float(schedule(50)) * np.sign(grads["w"]),
                             rtol=1e-4)


# --- End to end: train both end points, resume, evaluate the paths. -----------------


def _final_params(workdir):
  with checkpoint.Checkpointer(os.path.join(workdir, loop.CHECKPOINT_DIR)) as ckpt:
    return ckpt.read()["params"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The two quicktest language models, trained by the train task: {preset: workdir}."""
  root = tmp_path_factory.mktemp("lm")
  workdirs = {}
  for preset in SEEDS:
    workdirs[preset] = str(root / preset)
    tasks.run(train_configs.get_config(f"{preset},quicktest"), workdirs[preset])
  return workdirs


def _final_eval(workdir):
  with open(os.path.join(workdir, runs.FINAL_EVAL_FILE)) as f:
    return json.load(f)


@pytest.mark.slow  # trains two tiny language models (shared by this file's slow tests)
def test_the_train_task_trains_and_evaluates_a_language_model(trained):
  record = _final_eval(trained[SEEDS[0]])
  assert set(record["views"]) == {"test"} and record["num_test"] == 200
  assert np.isfinite(record["views"]["test"]["loss"])
  chance = 1 / sequences.TASK.num_values
  assert record["views"]["test"]["accuracy"] > chance  # 32 steps: past chance, not solved
  a, b = (runs.load_trained(trained[p]) for p in SEEDS)
  assert isinstance(a.model, CausalLM) and not a.batch_stats
  assert not np.array_equal(a.params["embed"]["kernel"], b.params["embed"]["kernel"])


@pytest.mark.slow
def test_a_language_model_run_resumes_to_bitwise_equal_params(trained, tmp_path):
  workdir = str(tmp_path / "resumed")
  shutil.copytree(trained[SEEDS[0]], workdir)
  final = _final_params(workdir)
  # An interrupted run: the last checkpoint (step 32) and the final record not written.
  shutil.rmtree(os.path.join(workdir, loop.CHECKPOINT_DIR, "32"))
  os.remove(os.path.join(workdir, runs.FINAL_EVAL_FILE))
  with checkpoint.Checkpointer(os.path.join(workdir, loop.CHECKPOINT_DIR)) as ckpt:
    assert ckpt.latest_step() == 24
  record = tasks.run(train_configs.get_config(f"{SEEDS[0]},quicktest"), workdir)
  assert record["step"] == 32 and record["seconds_this_session"] >= 0
  chex.assert_trees_all_equal(_final_params(workdir), final)
  assert record["views"] == _final_eval(trained[SEEDS[0]])["views"]


@pytest.mark.slow
@pytest.mark.parametrize("modifier", ["", ",repair"])
def test_eval_path_between_two_language_models(trained, tmp_path, modifier):
  config = eval_path_configs.get_config(f"recall_lm,quicktest{modifier}")
  config.start_workdir, config.end_workdir = (trained[p] for p in SEEDS)
  record = tasks.run(config, str(tmp_path / "eval"))
  assert set(record["paths"]) == {"linear", "linear (aligned)"}
  assert record["ts"] == [0.0, 0.5, 1.0]
  assert record["eval"] == {"dataset": "recall", "num_examples": 200, "seed": 0}
  assert record["renormalize"]["method"] == ("repair" if modifier else "none")
  assert record["renormalize"]["num_examples"] == 64
  assert record["alignment"]["method"] == "weight"
  assert any(f > 0 for f in record["alignment"]["fraction_of_units_moved"].values())
  ends = [_final_eval(trained[p])["views"]["test"] for p in SEEDS]
  # REPAIR at an end point rescales each unit by its own statistics: equal up to its epsilon.
  tolerance = dict(rtol=1e-4, atol=1e-6) if modifier else dict(rtol=1e-5, atol=1e-6)
  for name, path in record["paths"].items():
    test = path["views"]["test"]
    for i, end in ((0, ends[0]), (-1, ends[1])):  # the aligned end computes the same function
      np.testing.assert_allclose(test["loss"][i], end["loss"], **tolerance, err_msg=name)
      np.testing.assert_allclose(test["accuracy"][i], end["accuracy"], atol=1e-3, err_msg=name)
    barriers = path["barriers"]["test"]
    assert all(np.isfinite(v) for v in barriers.values()), barriers
    chord = 0.5 * (test["loss"][0] + test["loss"][-1])
    np.testing.assert_allclose(barriers["loss"], max(0.0, test["loss"][1] - chord), atol=1e-6)
    assert path["metric"] == "error" and isinstance(path["mechanistically_connected"], bool)
  assert os.path.exists(tmp_path / "eval" / eval_path_task.EVAL_PATH_FIGURE)


@pytest.mark.slow  # compiles the full recipes' steps
def test_the_presets_dry_run_before_their_end_points_exist(tmp_path):
  for preset, module, num_steps in [("recall_lm", train_configs, 1500),
                                    ("recall_lm,repair", eval_path_configs, 2 * 11)]:
    config = module.get_config(preset)
    config.dry_run = True
    if module is eval_path_configs:
      config.start_workdir = config.end_workdir = str(tmp_path / "not_trained_yet")
    record = tasks.run(config, str(tmp_path / "w"))
    assert "recall" in record["dry_run"] and record["steps"][0]["num_steps"] == num_steps
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_finetune_refuses_a_language_model_as_its_cue_model(trained, tmp_path):
  config = finetune_configs.get_config("naive,quicktest")
  config.cue_model_workdir = trained[SEEDS[0]]
  with pytest.raises(ValueError, match="holds a language model trained on 'recall'"):
    tasks.run(config, str(tmp_path / "ft"))
  assert not os.path.exists(tmp_path / "ft")
