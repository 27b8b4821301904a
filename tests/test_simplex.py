"""The simplex of N models: every point equals a separate evaluation of that model, its
vertices are the models, its edges the pairwise paths (BatchNorm and REPAIR), the barrier
its definition, the merged model its mean; named errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechconn import barriers
from mechconn import batchnorm
from mechconn import evaluation
from mechconn import finite
from mechconn import repair
from mechconn import simplex
from mechconn.models import get_model

TS = np.linspace(0, 1, 5)


def _batches(rng, n, b):
  return {"image": rng.normal(size=(n, b, 16, 16, 3)).astype(np.float32),
          "label": rng.integers(0, 10, (n, b)).astype(np.int32),
          "mask": np.ones((n, b), np.float32)}


@pytest.fixture(scope="module")
def setup():
  """Three SmallCNNs (BatchNorm), three MLPs (no BatchNorm: REPAIR), an eval set, BN data."""
  rng = np.random.default_rng(0)
  x = jnp.zeros((2, 16, 16, 3))
  cnn = get_model("small_cnn", 10, width=4)
  mlp = get_model("mlp", 10, hidden=(8, 6))
  models = {"cnn": (cnn.apply, [cnn.init(jax.random.key(s), x)["params"] for s in range(3)]),
            "mlp": (mlp.apply, [mlp.init(jax.random.key(s), x)["params"] for s in range(3)])}
  return models, {"eval": _batches(rng, 2, 16)}, {"image": _batches(rng, 2, 16)["image"]}


@pytest.fixture(scope="module")
def cnn_simplex(setup):
  models, sets, bn = setup
  apply_fn, params = models["cnn"]
  grid = simplex.simplex_grid(3, num_samples=3, seed=1)
  return grid, simplex.evaluate_simplex(apply_fn, params, grid, sets, bn)["eval"]


def _separately(apply_fn, params, eval_set, bn):
  """One model evaluated on its own: BatchNorm recomputed, exact means."""
  stats = batchnorm.recompute_batch_stats(apply_fn, {"params": params}, bn)
  return evaluation.mean_metrics(apply_fn, {"params": params, "batch_stats": stats}, eval_set)


def test_the_grid_holds_vertices_edge_midpoints_centroid_and_samples():
  grid = simplex.simplex_grid(4, num_samples=5, seed=0)
  assert len(grid.labels) == grid.weights.shape[0] == 4 + 6 + 1 + 5
  np.testing.assert_array_equal(grid.weights[:4], np.eye(4))
  assert grid.labels[4] == "edge 0-1" and grid.labels[10] == "centroid"
  np.testing.assert_allclose(grid.weights[10], np.full(4, 0.25))
  np.testing.assert_allclose(grid.weights.sum(1), 1.0)
  assert (grid.weights >= 0).all()
  assert simplex.simplex_grid(2, num_samples=0).labels == ("vertex 0", "vertex 1", "edge 0-1")


def test_every_point_equals_a_separate_evaluation_and_vertices_are_the_models(setup, cnn_simplex):
  models, sets, bn = setup
  apply_fn, params = models["cnn"]
  grid, result = cnn_simplex
  for k, w in enumerate(grid.weights):
    mixed = jax.tree.map(lambda *xs: sum(float(wi) * x for wi, x in zip(w, xs)), *params)
    expected = _separately(apply_fn, mixed, sets["eval"], bn)
    for metric, value in expected.items():
      assert result.metrics[metric][k] == pytest.approx(float(value), rel=2e-5, abs=1e-6), \
          (grid.labels[k], metric)
  for i in range(3):  # the vertices are the models themselves, bit for bit
    expected = _separately(apply_fn, params[i], sets["eval"], bn)
    assert result.at(f"vertex {i}") == {m: float(v) for m, v in expected.items()}


def test_the_barrier_is_the_rise_above_the_vertices_weighted_alike(cnn_simplex):
  grid, result = cnn_simplex
  loss = np.asarray(result.metrics["loss"])
  error = 1 - np.asarray(result.metrics["accuracy"])
  for k, w in enumerate(grid.weights):
    assert result.barriers()["loss"][k] == pytest.approx(loss[k] - sum(
        w[i] * loss[i] for i in range(3)), abs=1e-6)
    assert result.barriers()["error"][k] == pytest.approx(error[k] - sum(
        w[i] * error[i] for i in range(3)), abs=1e-6)
  summary = result.summary()
  best = int(np.argmax(result.barriers()["loss"]))
  assert summary["loss_label"] == grid.labels[best]
  assert summary["loss_at"] == pytest.approx(grid.weights[best].tolist())
  assert summary["loss"] == pytest.approx(float(result.barriers()["loss"][best]))


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_pairwise_barriers_are_the_pairs_paths(setup, kind):
  models, sets, bn = setup
  apply_fn, params = models[kind]
  renormalize = "repair" if kind == "mlp" else "auto"
  result = simplex.pairwise_barriers(apply_fn, params, TS, sets, bn,
                                     renormalize=renormalize)["eval"]
  for i, j in itertools.combinations(range(3), 2):
    path = barriers.evaluate_path(apply_fn, (params[i], params[j]), TS, sets["eval"],
                                  bn_batches=bn, renormalize=renormalize)
    np.testing.assert_allclose(result.paths[(i, j)].loss, path.loss, rtol=2e-5)
    np.testing.assert_allclose(result.paths[(i, j)].accuracy, path.accuracy)
    assert result.matrix("loss")[i, j] == result.matrix("loss")[j, i] == pytest.approx(
        path.summary()["loss"], abs=1e-5)
  assert np.all(np.diag(result.matrix("error")) == 0)


def test_repair_at_the_centroid_renormalises_to_the_mean_of_the_models_statistics(setup):
  models, sets, bn = setup
  apply_fn, params = models["mlp"]
  grid = simplex.simplex_grid(3, num_samples=0)
  result = simplex.evaluate_simplex(apply_fn, params, grid, sets, bn, renormalize="repair")
  example = jnp.asarray(bn["image"][0])
  repaired = repair.Repaired(apply_fn, repair.sites_of(apply_fn, {"params": params[0]}, example))
  stats = [repair.endpoint_stats(repaired, p, bn) for p in params]
  mean = {site: {k: sum(s[site][k] for s in stats) / 3 for k in ("mean", "std")}
          for site in stats[0]}
  merged = jax.tree.map(lambda *xs: sum(xs) / 3, *params)
  variables = repair.repaired_variables(repaired, merged, mean, mean, 0.0, bn)
  expected = evaluation.mean_metrics(repaired, variables, sets["eval"])
  assert result["eval"].at("centroid")["loss"] == pytest.approx(float(expected["loss"]), rel=1e-5)


def test_merged_variables_are_the_mean_with_recomputed_statistics(setup):
  models, sets, bn = setup
  apply_fn, params = models["cnn"]
  merged = simplex.merged_variables(apply_fn, params, bn)
  mean = jax.tree.map(lambda *xs: (xs[0] + xs[1] + xs[2]) / 3, *params)
  np.testing.assert_allclose(merged["params"]["Conv_0"]["kernel"], mean["Conv_0"]["kernel"],
                             rtol=1e-6, atol=1e-7)
  expected = batchnorm.recompute_batch_stats(apply_fn, {"params": mean}, bn)
  np.testing.assert_allclose(merged["batch_stats"]["BatchNorm_0"]["var"],
                             expected["BatchNorm_0"]["var"], rtol=1e-5)
  with pytest.raises(ValueError, match="REPAIR"):
    simplex.merged_variables(apply_fn, params, bn, renormalize="repair")


def test_bad_weights_and_inputs_are_named_errors(setup):
  models, sets, bn = setup
  apply_fn, params = models["cnn"]
  with pytest.raises(ValueError, match="sum to 1 per row; row 1"):
    simplex.evaluate_simplex(apply_fn, params, np.array([[1, 0, 0], [0.5, 0.6, 0]]), sets, bn)
  with pytest.raises(ValueError, match=r"\[K, N\] with N = 3"):
    simplex.evaluate_simplex(apply_fn, params, np.ones((2, 2)) / 2, sets, bn)
  with pytest.raises(ValueError, match="num_models must be an integer >= 2"):
    simplex.simplex_grid(1)
  with pytest.raises(ValueError, match="full variables"):
    simplex.evaluate_simplex(apply_fn, [{"params": p} for p in params],
                             simplex.simplex_grid(3, num_samples=0), sets, bn)
  broken = jax.tree.map(lambda x: x, params[1])
  broken["Conv_0"]["kernel"] = broken["Conv_0"]["kernel"].at[0, 0, 0, 0].set(jnp.nan)
  with pytest.raises(finite.NonFiniteError, match="model 1"):
    simplex.evaluate_simplex(apply_fn, [params[0], broken, params[2]],
                             simplex.simplex_grid(3, num_samples=0), sets, bn)


def test_a_grid_without_every_vertex_has_no_barrier(setup):
  models, sets, bn = setup
  apply_fn, params = models["cnn"]
  result = simplex.evaluate_simplex(apply_fn, params, np.full((1, 3), 1 / 3), sets, bn)
  assert np.isfinite(result["eval"].metrics["loss"]).all()
  with pytest.raises(ValueError, match="needs every vertex"):
    result["eval"].summary()


def test_constant_statistics_data_is_refused_as_for_paths(setup):
  models, sets, _ = setup
  apply_fn, params = models["cnn"]
  zeros = {"image": np.zeros((2, 16, 16, 16, 3), np.float32)}
  with pytest.raises(ValueError, match="zero variance at layer"):
    simplex.evaluate_simplex(apply_fn, params, simplex.simplex_grid(3, num_samples=0), sets,
                             zeros)
  with pytest.raises(ValueError, match="at least 2 models"):
    simplex.pairwise_barriers(apply_fn, params[:1], TS, sets, zeros)
