"""mechconn.tasks.merge: its config checks, its dry run, and one tiny run end to end (three
end points trained by the task, merged by every method) checked against an independent
evaluation of the merged model."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from experiments.configs import merge as merge_config
from mechconn import align
from mechconn import batchnorm
from mechconn import counterfactual
from mechconn import evaluation
from mechconn import mesh as mesh_lib
from mechconn import multi_align
from mechconn import simplex
from mechconn import tasks
from mechconn.tasks import data as task_data
from mechconn.tasks import merge as merge_task
from mechconn.tasks import runner
from mechconn.tasks import runs as runs_lib


def _config(preset="cpu,quicktest", **fields):
  config = merge_config.get_config(preset)
  for key, value in fields.items():
    section, _, field = key.rpartition(".")
    node = config
    for part in filter(None, section.split(".")):
      node = node[part]
    node[field] = value
  return config


@pytest.mark.parametrize("fields, message", [
    ({"endpoints.seeds": ()}, r"config.endpoints.seeds=\(\), config.endpoints.workdirs=\(\): "
                              r"give one of them"),
    ({"endpoints.workdirs": ("a", "b")}, r"give one of them"),
    ({"endpoints.seeds": (0,)}, r"of 2 or more end points"),
    ({"endpoints.seeds": (0, 0)}, r"config.endpoints.seeds=\(0, 0\) repeats a seed"),
    ({"endpoints.seeds": (), "endpoints.workdirs": ("a", "a")},
     r"config.endpoints.workdirs=\('a', 'a'\) must be distinct"),
    ({"endpoints.train.optimizer.learning_rate": -1.0},
     r"config.endpoints.train \(the recipe\): config.optimizer.learning_rate=-1.0 must be > 0"),
    ({"endpoints.train.dry_run": True}, r"config.endpoints.train.dry_run=True"),
    ({"endpoints.train.model.name": "vgg16"}, r"config.model.name='vgg16' is not valid"),
    ({"sizes": (2, 4)}, r"config.sizes=\(2, 4\) must increase.*at most the 3 end points"),
    ({"sizes": (3, 2)}, r"config.sizes=\(3, 2\) must increase"),
    ({"sizes": (1, 2)}, r"config.sizes\[0\]=1 must be at least 2"),
    ({"align.methods": ("none", "procrustes")},
     r"config.align.methods\[1\]='procrustes' is not valid; valid choices: \['merge_many', "
     r"'none', 'synchronized'\]"),
    ({"align.methods": ("none", "none")}, r"config.align.methods=\('none', 'none'\) must be"),
    ({"align.matching": "cosine"}, r"config.align.matching='cosine'.*\['activation', 'weight'\]"),
    ({"align.activation_sites": "post_gelu"}, r"config.align.activation_sites='post_gelu'"),
    ({"align.max_sweeps": 0}, r"config.align.max_sweeps=0 must be a positive integer"),
    ({"simplex.num_samples": -1}, r"config.simplex.num_samples=-1 must be a non-negative"),
    ({"simplex.concentration": 0.0}, r"config.simplex.concentration=0.0 must be > 0"),
    ({"path.bn_data": "test"}, r"config.path.bn_data='test'.*\['clean', 'train'\]"),
    ({"path.num_t": 1}, r"config.path.num_t=1 must be at least 2"),
    ({"path.bn_examples": 40}, r"config.path.bn_examples=40 must make a full batch of "
                               r"eval_batch_size=80"),
    ({"data.dataset": "cifar11"}, r"config.data.dataset='cifar11' is not valid"),
    ({"data.dataset": "recall"}, r"sequence dataset; the merge task takes image datasets"),
    ({"seed": -1}, r"config.seed=-1 must be a non-negative integer"),
])
def test_invalid_values_name_the_key(fields, message):
  config = _config(**fields)
  with pytest.raises(ValueError, match=message):
    merge_task.resolve(config, num_devices=1)


@pytest.mark.parametrize("preset", list(merge_config.presets()))
def test_every_preset_resolves_locked(preset):
  for name in (preset, f"{preset},quicktest"):
    config = merge_config.get_config(name)
    spec = merge_task.resolve(config, num_devices=8)
    assert spec.num_models == (3 if "quicktest" in name else 8)
    assert max(spec.sizes) == spec.num_models
    with pytest.raises(AttributeError):
      config.not_a_field = 1
  cpu, activation = merge_config.get_config("cpu"), merge_config.get_config("cpu_activation")
  assert activation.align.matching == "activation" and cpu.align.matching == "weight"
  # One recipe: cpu_activation reads (or trains) the cpu preset's end points.
  assert activation.endpoints.train.to_dict() == cpu.endpoints.train.to_dict()
  assert activation.endpoints.directory == merge_config.CPU_ENDPOINTS
  assert merge_config.get_config("cpu_activation,quicktest").endpoints.directory == ""
  workdirs = merge_config.get_config("workdirs").endpoints.workdirs
  assert workdirs == tuple(f"{merge_config.CPU_ENDPOINTS}/seed_{s}" for s in range(8))


def test_each_end_point_is_the_recipe_with_its_seed_and_the_data():
  spec = merge_task.resolve(_config(), num_devices=1)
  assert [t.seed for t in spec.trains] == [0, 1, 2]
  assert {t.data for t in spec.trains} == {spec.data}
  assert [c["seed"] for c in spec.train_configs] == [0, 1, 2]
  assert spec.train_configs[0]["task"] == "train"


@pytest.mark.slow  # compiles a training step and an evaluation
def test_dry_run_reads_no_data_and_writes_nothing(tmp_path):
  config = _config(dry_run=True)
  record = tasks.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  train_step, point = record["steps"]
  assert train_step["name"] == "end point train step"
  assert train_step["num_steps"] == 3 * config.endpoints.train.num_epochs * (512 // 32)
  grid = simplex.simplex_grid(3, num_samples=config.simplex.num_samples)
  assert point["num_steps"] == 3 * (2 + len(grid.labels) + 3 * config.path.num_t)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("merge"))
  config = _config(**{"endpoints.train.num_epochs": 1})
  return workdir, config, tasks.run(config, workdir)


def _finite(tree) -> bool:
  return all(np.all(np.isfinite(np.asarray(x, float))) for x in jax.tree.leaves(tree)
             if x is not None and not isinstance(x, str))


@pytest.mark.slow
def test_record_is_complete_finite_and_written(merged):
  workdir, config, record = merged
  with open(os.path.join(workdir, merge_task.MERGE_FILE)) as f:
    assert json.load(f) == json.loads(json.dumps(record))
  assert os.path.getsize(os.path.join(workdir, merge_task.MERGE_FIGURE)) > 10_000
  assert record["num_models"] == 3 and record["sizes"] == [2, 3]
  assert list(record["methods"]) == ["none", "merge_many", "synchronized"]
  views = {"clean", "cue", "rand_cue", "rand_img"}
  num_points = len(record["simplex_grid"]["labels"])
  for method, entry in record["methods"].items():
    assert list(entry["merged"]) == ["2", "3"]
    for row in entry["merged"].values():
      assert set(row["views"]) == views
    assert set(entry["simplex"]) == set(entry["pairwise"]) == views
    for view, s in entry["simplex"].items():
      assert len(s["metrics"]["accuracy"]) == num_points
      k = int(np.argmax(s["barriers"]["error"]))  # the summary is the barriers' maximum
      assert s["summary"]["error"] == pytest.approx(s["barriers"]["error"][k])
      assert s["summary"]["error_label"] == record["simplex_grid"]["labels"][k]
      matrix = np.asarray(entry["pairwise"][view]["error"])
      assert matrix.shape == (3, 3) and np.all(np.diag(matrix) == 0)
      np.testing.assert_allclose(matrix, matrix.T)
    if method == "none":
      assert entry["cycle_error"] is None and entry["alignment_of_all"]["seconds"] == 0.0
    else:  # one frame: the pairwise maps compose
      assert entry["cycle_error"] == 0.0 and entry["alignment_of_all"]["sweeps"] >= 1
  assert _finite(record["methods"]) and _finite(record["endpoints"])
  assert 0.0 <= record["independent_pairwise"]["cycle_error"] <= 1.0
  assert [e["seed"] for e in record["endpoints"]] == [0, 1, 2]
  assert record["endpoints"][0]["identity"]["config"]["seed"] == 0
  assert record["config"]["task"] == "merge" and record["best_method"] in record["methods"]
  table = merge_task.format_table(record)
  assert "synchronized        3" in table and "cycle error: independent pairwise" in table


@pytest.mark.slow
@pytest.mark.parametrize("method, n", [("none", 2), ("none", 3), ("synchronized", 3)])
def test_merged_accuracy_equals_an_independent_evaluation(merged, method, n):
  workdir, config, record = merged
  spec = merge_task.resolve(config, num_devices=1)
  models = [runs_lib.load_trained(os.path.join(workdir, "endpoints", f"seed_{s}"))
            for s in (0, 1, 2)[:n]]
  variables = [m.variables for m in models]
  if method != "none":
    perm_spec = align.permutation_spec("small_cnn", models[0].params)
    variables = multi_align.align_models(perm_spec, variables, method=method).aligned(
        perm_spec, variables)
  params = simplex.merged_params([v["params"] for v in variables])
  split = task_data.load_train_split(spec.data, cue_proportion=0.0,
                                     num_examples=config.path.bn_examples)
  bn = task_data.bn_batches_of(split.examples(np.arange(len(split))), config.eval_batch_size)
  apply_fn = models[0].model.apply
  stats = batchnorm.recompute_batch_stats(apply_fn, {"params": params}, bn)
  views, labels = task_data.load_test_views(spec.data)
  stacked = counterfactual.stack_views(views, labels, config.eval_batch_size)
  for view in ("clean", "rand_img"):
    means = evaluation.mean_metrics(apply_fn, {"params": params, "batch_stats": stats},
                                    stacked[view])
    recorded = record["methods"][method]["merged"][str(n)]["views"][view]
    assert recorded["accuracy"] == pytest.approx(float(means["accuracy"]), abs=1e-6)
    assert recorded["loss"] == pytest.approx(float(means["loss"]), rel=1e-4)


@pytest.mark.slow
def test_a_relaunch_reuses_the_trained_end_points(merged, monkeypatch):
  workdir, config, _ = merged
  finals = [os.path.join(workdir, "endpoints", f"seed_{s}", runs_lib.FINAL_EVAL_FILE)
            for s in (0, 1, 2)]
  before = [os.stat(f).st_mtime_ns for f in finals]

  def retrain(*args, **kwargs):
    raise AssertionError("a finished end point was retrained")

  monkeypatch.setattr(runner, "launch_resolved", retrain)
  spec = merge_task.resolve(config, num_devices=1)
  job = runner.Job(mesh_lib.data_mesh(), workdir=workdir)
  models = merge_task.trained_endpoints(spec, job)
  assert [m.config["seed"] for m in models] == [0, 1, 2]
  assert [os.stat(f).st_mtime_ns for f in finals] == before
  # Another recipe is not reused: its run directories are refused (without --overwrite).
  other = _config(**{"endpoints.train.num_epochs": 2})
  with pytest.raises(FileExistsError, match="num_epochs"):
    merge_task.trained_endpoints(merge_task.resolve(other, num_devices=1), job)


@pytest.mark.slow
def test_given_workdirs_are_loaded_checked_and_identified(merged):
  workdir, config, _ = merged
  dirs = tuple(os.path.join(workdir, "endpoints", f"seed_{s}") for s in (0, 1, 2))
  spec = merge_task.resolve(_config(**{"endpoints.seeds": (), "endpoints.workdirs": dirs}), 1)
  models, identities = merge_task.inputs(spec, dry_run=False)
  assert [i["config"]["seed"] for i in identities["endpoints"]] == [0, 1, 2]
  twin = dataclasses.replace(models[0], checkpoint="elsewhere")
  with pytest.raises(ValueError, match=r"End points 0 .* and 3 \(elsewhere\) have identical"):
    merge_task.check_models([*models, twin], spec)
