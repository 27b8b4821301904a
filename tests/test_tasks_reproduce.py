"""End to end on tiny runs: the reproduce study and the single-method finetune task."""

import json
import os

import numpy as np
import pytest

from experiments.configs import finetune as finetune_config
from experiments.configs import reproduce as reproduce_config
from mechconn import barriers
from mechconn import tasks
from mechconn import timing
from mechconn import workdir as workdir_lib
from mechconn.data import pipeline
from mechconn.tasks import data as task_data
from mechconn.tasks import finetune as finetune_task
from mechconn.tasks import methods
from mechconn.tasks import reproduce
from mechconn.tasks import study_report


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reproduce"))
  config = reproduce_config.get_config("cpu,quicktest")
  return workdir, config, tasks.run(config, workdir)


@pytest.mark.slow
def test_reproduce_writes_every_number_and_the_report(study):
  workdir, config, record = study
  with open(os.path.join(workdir, reproduce.REPRODUCE_FILE)) as f:
    assert json.load(f) == json.loads(json.dumps(record))
  assert list(record["methods"]) == list(config.finetune.methods)
  for method, row in record["methods"].items():
    runs = []
    for seed in config.seeds:
      with open(os.path.join(workdir, "runs", f"{method}_seed{seed}", reproduce.RESULT_FILE)) as f:
        runs.append(json.load(f))
    for view, summary in row["views"].items():
      values = [r["views"][view]["accuracy"] for r in runs]
      assert summary["values"] == values
      assert summary["mean"] == pytest.approx(np.mean(values))
      assert summary["std"] == pytest.approx(np.std(values))
    ts = np.asarray(record["ts"])
    for r in runs:  # the barriers are the barriers of the stored path
      path = r["path_to_cue_model"]
      assert set(path["summary"]) == {"loss", "loss_t", "error", "error_t"}
      assert path["summary"]["loss"] == pytest.approx(
          float(barriers.barrier_height(ts, np.asarray(path["loss"]))), abs=1e-6)
      assert path["summary"]["error"] == pytest.approx(
          float(barriers.barrier_height(ts, 1 - np.asarray(path["accuracy"]))), abs=1e-6)
    assert row["loss_barrier_to_cue_model"]["values"] == [
        r["path_to_cue_model"]["summary"]["loss"] for r in runs]
  text = open(os.path.join(workdir, reproduce.REPORT_FILE)).read()
  assert "| cbft |" in text and "views.png" in text
  # Where the wall time went: every phase the study has, summing to its wall time.
  wall = record["wall_time"]
  for phase in (timing.TRAINING, timing.COMPILATION, timing.EVALUATION, timing.PATH_EVALUATION,
                timing.DATA, timing.CHECKPOINTS, timing.OUTPUTS):
    assert wall["seconds"][phase] > 0, phase
  assert sum(wall["seconds"].values()) == pytest.approx(wall["wall_seconds"], abs=0.05)
  assert record["wall_seconds"] == wall["wall_seconds"] and timing.STARTUP not in wall["seconds"]
  assert wall["compilations"] > 0 and record["machine"]["matmul_gflops_float32"] > 0
  assert "| phase | seconds | share |" in text and "**all but training steps**" in text
  # A record written before the study timed itself reads without a breakdown or a machine.
  older = {k: v for k, v in record.items() if k not in ("wall_time", "machine")}
  old_text = study_report.format_report(older)
  assert study_report.format_table(older) in old_text and "| phase |" not in old_text
  assert f"Wall time {record['wall_seconds']:.0f} s from the launch on cpu" in old_text
  for figure in ("views.png", "paths.png"):
    assert os.path.getsize(os.path.join(workdir, figure)) > 5_000


def _result_mtimes(workdir):
  runs = os.path.join(workdir, "runs")
  return {d: os.stat(os.path.join(runs, d, reproduce.RESULT_FILE)).st_mtime_ns
          for d in sorted(os.listdir(runs))
          if os.path.exists(os.path.join(runs, d, reproduce.RESULT_FILE))}


@pytest.mark.slow
def test_relaunch_skips_finished_runs(study):
  workdir, config, record = study
  before = _result_mtimes(workdir)
  again = tasks.run(config, workdir)
  assert again["methods"] == record["methods"]
  assert _result_mtimes(workdir) == before  # reused, not recomputed


def _naive_study(cue_dir, methods=("naive",)):
  config = reproduce_config.get_config("cpu,quicktest")
  config.cue_model_workdir = cue_dir  # the study's cue model: no training here
  config.finetune.methods = methods
  config.seeds = (0,)
  return config


@pytest.mark.slow
def test_overwrite_after_a_change_never_reuses_old_runs(study, tmp_path):
  cue_dir = os.path.join(study[0], "cue_model")
  workdir = str(tmp_path / "w")
  config = _naive_study(cue_dir, ("naive", "lp"))
  first = tasks.run(config, workdir)
  changed = _naive_study(cue_dir, ("naive", "lp"))
  changed.finetune.naive.learning_rate = 0.05
  with pytest.raises(FileExistsError, match=r"differs in \['finetune.naive.learning_rate'\]"):
    tasks.run(changed, workdir)
  lp_before = _result_mtimes(workdir)["lp_seed0"]
  second = tasks.run(changed, workdir, overwrite=True)
  # lp does not read naive's learning rate: its run (same recorded config) is kept.
  assert _result_mtimes(workdir)["lp_seed0"] == lp_before
  assert second["methods"]["lp"] == first["methods"]["lp"]
  run_dir = os.path.join(workdir, "runs", "naive_seed0")
  with open(os.path.join(run_dir, "config.json")) as f:
    assert json.load(f)["study"]["finetune"]["naive"]["learning_rate"] == 0.05
  assert (second["methods"]["naive"]["views"]["clean"]["values"] !=
          first["methods"]["naive"]["views"]["clean"]["values"])
  # A run directory whose recorded config is not the study's (stale) is never read: it is
  # refused, and with --overwrite redone.
  with open(os.path.join(run_dir, "config.json")) as f:
    recorded = json.load(f)
  recorded["study"]["finetune"]["naive"]["learning_rate"] = 0.5
  workdir_lib.write_json_atomic(os.path.join(run_dir, "config.json"), recorded)
  before = _result_mtimes(workdir)
  with pytest.raises(FileExistsError, match=r"runs/naive_seed0 holds a run of a different "
                                            r"config .*study.finetune.naive.learning_rate"):
    tasks.run(changed, workdir)
  assert _result_mtimes(workdir) == before  # refused: nothing deleted
  third = tasks.run(changed, workdir, overwrite=True)
  after = _result_mtimes(workdir)
  assert after["naive_seed0"] != before["naive_seed0"] and after["lp_seed0"] == before["lp_seed0"]
  assert third["methods"]["naive"]["views"] == second["methods"]["naive"]["views"]


@pytest.mark.slow
def test_a_given_cue_model_must_match_the_study_recipe(study, tmp_path):
  config = _naive_study(os.path.join(study[0], "cue_model"))
  config.train.data.cue_proportion = 0.0
  config.train.model.kwargs.width = 8
  with pytest.raises(ValueError, match=r"holds a model trained with data.cue_proportion=0.8, "
                                       r"model.kwargs.width=4 but config.train has "
                                       r"data.cue_proportion=0.0, model.kwargs.width=8"):
    tasks.run(config, str(tmp_path / "w"))
  config = _naive_study(str(tmp_path / "no_such_run"))
  with pytest.raises(FileNotFoundError, match="no finished train run"):
    tasks.run(config, str(tmp_path / "w"))
  config = _naive_study(os.path.join(study[0], "cue_model"))
  config.finetune.num_clean = 10_000  # more than the cue model's 512 training examples
  with pytest.raises(ValueError, match=r"num_clean=10000 \+ finetune.num_cue=200 exceed the 512"):
    tasks.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # refused before the workdir was claimed


def test_clean_and_cue_sets_are_disjoint_and_cued_as_asked():
  images = np.zeros((50, 32, 32, 3), np.uint8)
  labels = np.arange(50) % 10
  split = pipeline.make_cue_split(images, labels, 10, "box", 0.5)
  clean, cue = task_data.split_clean_and_cue(split, 10, -1, seed=0)
  assert len(clean) == 10 and len(cue) == 40
  assert not clean.has_cue.any() and cue.has_cue.all()
  with pytest.raises(ValueError, match="exceed the 50 training examples"):
    task_data.split_clean_and_cue(split, 30, 30, seed=0)


def test_official_cbft_cue_set_keeps_the_split_s_cue_flags():
  """cue_set='as_split' (the official script's draw): the same examples as 'all_cued', each
  cued exactly when the cue model's training split cued it (about p of them)."""
  labels = np.arange(1000) % 10
  images = np.random.default_rng(0).integers(0, 255, (1000, 32, 32, 3), np.uint8)
  split = pipeline.make_cue_split(images, labels, 10, "box", 0.8)
  clean, all_cued = task_data.split_clean_and_cue(split, 100, 500, seed=3)
  clean_b, as_split = task_data.split_clean_and_cue(split, 100, 500, seed=3,
                                                        cue_set="as_split")
  np.testing.assert_array_equal(as_split.images, all_cued.images)
  np.testing.assert_array_equal(clean_b.images, clean.images)
  assert all_cued.has_cue.all() and not clean_b.has_cue.any()
  rows = [int(np.flatnonzero((images == im).all(axis=(1, 2, 3)))[0]) for im in as_split.images]
  np.testing.assert_array_equal(as_split.has_cue, split.has_cue[rows])
  assert 0.7 < as_split.has_cue.mean() < 0.9
  with pytest.raises(ValueError, match=r"finetune.cbft.cue_set='some'.*'all_cued', 'as_split'"):
    task_data.split_clean_and_cue(split, 100, 500, seed=3, cue_set="some")


@pytest.mark.slow
def test_finetune_task_runs_one_method(study, tmp_path):
  workdir, _, record = study
  config = finetune_config.get_config("lp,quicktest")
  config.cue_model_workdir = os.path.join(workdir, "cue_model")
  result = tasks.run(config, str(tmp_path / "lp"))
  assert set(result["views"]) == {"clean", "cue", "rand_cue", "rand_img"}
  assert result["num_clean"] == 100
  with pytest.raises(ValueError, match="valid presets"):
    finetune_config.get_config("sgd,quicktest")
  unknown = reproduce_config.get_config("cpu,quicktest")
  unknown.finetune.methods = ("sgd",)
  with pytest.raises(ValueError, match="valid methods"):
    reproduce.resolve(unknown, 1)


@pytest.mark.slow
def test_scratch_baseline_starts_from_a_fresh_init_not_the_cue_model(study, tmp_path):
  """The scratch row: the naive loop on the same clean set from `rngs.scratch_init_key(seed)`,
  never the cue model's own initialisation, with
  fresh BatchNorm statistics; nothing of the cue model but its architecture."""
  import jax
  from mechconn import rngs
  from mechconn.tasks import runs
  workdir, _, _ = study
  cue_dir = os.path.join(workdir, "cue_model")
  cue_model = runs.load_trained(cue_dir)
  split = pipeline.load_train_split("shapes10", "box", 0.8, num_examples=512)
  clean, _ = task_data.split_clean_and_cue(split, 100, 200, seed=0)
  start, stats = methods.start_variables("scratch", 4, cue_model, clean, None)
  fresh = cue_model.model.init(rngs.scratch_init_key(4), clean.examples(np.arange(1))["image"])
  for a, b, c in zip(jax.tree.leaves(start), jax.tree.leaves(fresh["params"]),
                     jax.tree.leaves(cue_model.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(a, c)
  assert all(float(np.abs(m).max()) == 0 for m in jax.tree.leaves(
      {k: v["mean"] for k, v in stats.items()}))
  config = finetune_config.get_config("scratch,quicktest")
  config.cue_model_workdir = cue_dir
  result = tasks.run(config, str(tmp_path / "scratch"))
  assert result["method"] == "scratch" and result["num_clean"] == 100
  assert all(0 <= v["accuracy"] <= 1 for v in result["views"].values())


@pytest.mark.slow
def test_finetune_task_views_at_a_test_cue_proportion(study, tmp_path):
  """config.data.test_cue_proportion reaches the fine-tuned model's views: 0 cues no test image,
  so the cue and rand_cue views are the clean one."""
  workdir, _, _ = study
  config = finetune_config.get_config("lp,quicktest")
  config.cue_model_workdir = os.path.join(workdir, "cue_model")
  config.data.test_cue_proportion = 0.0
  result = tasks.run(config, str(tmp_path / "lp0"))
  views = {k: v["accuracy"] for k, v in result["views"].items()}
  assert views["cue"] == views["rand_cue"] == views["clean"]
  config.data.test_cue_proportion = 1.5
  with pytest.raises(ValueError, match=r"config.data.test_cue_proportion=1.5 must be in \[0, 1\]"):
    tasks.run(config, str(tmp_path / "bad"))


@pytest.mark.slow
def test_finetune_of_a_cue_model_retrained_in_place_is_refused(tmp_path):
  cue = str(tmp_path / "cue")
  tasks.run(reproduce_config.get_config("cpu,quicktest").train, cue)
  config = finetune_config.get_config("lp,quicktest")
  config.cue_model_workdir = cue
  tasks.run(config, str(tmp_path / "lp"))
  retrained = reproduce_config.get_config("cpu,quicktest").train
  retrained.seed = 7
  tasks.run(retrained, cue, overwrite=True)
  with pytest.raises(FileExistsError, match=r"differs in \['inputs.cue_model.config.seed'\]"):
    tasks.run(config, str(tmp_path / "lp"))  # was: old numbers, new provenance


@pytest.mark.slow
@pytest.mark.parametrize("conv_impl", [None, "patches"])
def test_vmapped_seed_ensemble_matches_separate_runs(study, tmp_path, conv_impl, monkeypatch):
  """seed_mode='vmap': one compiled step for all seeds gives each seed's separate run, also
  with the ensemble's convolutions as patches + matmul (what GPUs use: ENSEMBLE_CONV_IMPL)."""
  if conv_impl:
    monkeypatch.setitem(methods.ENSEMBLE_CONV_IMPL, "cpu", conv_impl)
  workdir, config, record = study
  config = reproduce_config.get_config("cpu,quicktest")
  config.cue_model_workdir = os.path.join(workdir, "cue_model")
  config.finetune.methods = ("naive", "cbft")
  config.seed_mode = "vmap"
  together = tasks.run(config, str(tmp_path / "vmap"))
  assert os.path.isdir(tmp_path / "vmap" / "runs" / "naive_seeds0-1" / "checkpoints")
  for method in ("naive", "cbft"):
    for seed in config.seeds:
      with open(os.path.join(workdir, "runs", f"{method}_seed{seed}", reproduce.RESULT_FILE)) as f:
        alone = json.load(f)
      with open(tmp_path / "vmap" / "runs" / f"{method}_seed{seed}" / reproduce.RESULT_FILE) as f:
        vmapped = json.load(f)
      assert vmapped["seeds_vmapped"] and not alone["seeds_vmapped"]
      for view, r in alone["views"].items():
        assert vmapped["views"][view]["loss"] == pytest.approx(r["loss"], rel=1e-3)
        assert vmapped["views"][view]["accuracy"] == pytest.approx(r["accuracy"], abs=0.011)
  assert set(together["methods"]) == {"naive", "cbft"}
  with pytest.raises(ValueError, match=r"seed_mode='pool' .*valid"):
    reproduce.seed_mode("pool")


@pytest.mark.parametrize("method", ["naive", "cbft"])
def test_an_ensemble_conv_impl_replaces_the_steps_convolutions(method):
  import jax
  import jax.numpy as jnp
  from mechconn import mesh as mesh_lib
  from mechconn.models import get_model
  from mechconn.tasks import runs
  model = get_model("small_cnn", 10, width=4)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  cue = runs.TrainedModel(model=model, params=variables["params"],
                          batch_stats=variables["batch_stats"], config={}, checkpoint="")
  ft = finetune_task.resolve(finetune_config.get_config(f"{method},quicktest"), 1).finetune
  mesh = mesh_lib.data_mesh(jax.devices()[:1])

  def step_model(**kwargs):
    shared = methods.method_loop(method, ft, cue, mesh, **kwargs)
    return shared.member_step.keywords["loss_fn"].apply_fn.__self__

  assert step_model().conv_impl == "auto"
  patched = step_model(conv_impl="patches")
  assert patched.conv_impl == "patches" and patched.width == model.width  # same parameters


def test_the_studys_fields_are_checked_where_they_belong():
  """Fast refusals of resolve, each naming its field."""
  config = reproduce_config.get_config("cpu,quicktest")
  config.train.dry_run = True  # would dry-run the cue model alone, then find no model
  with pytest.raises(ValueError, match=r"config.train.dry_run=True .*config.dry_run=True"):
    reproduce.resolve(config, 1)
  config = reproduce_config.get_config("cpu,quicktest")
  config.train.data.dataset = "recall"  # named as data, before the image model's fields
  with pytest.raises(ValueError, match=r"'recall' is a sequence dataset; the reproduce task"):
    reproduce.resolve(config, 1)
  config = finetune_config.get_config("lp,quicktest")
  config.finetune.methods = ("naive", "lp")
  with pytest.raises(ValueError, match=r"config.finetune.methods=\('naive', 'lp'\) but this "
                                       r"task fine-tunes config.method='lp' alone"):
    finetune_task.resolve(config, 1)
