"""feature_connectivity against plain loops over t, with features read independently."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechconn import batchnorm, finite
from mechconn.data.batching import stack_batches
from mechconn.diagnostics import features

TS = np.linspace(0, 1, 5)


class TinyCNN(nn.Module):
  """conv -> BN -> ReLU -> conv (stride 2) -> BN -> ReLU -> mean -> dense."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(3, (3, 3))(x)))
    x = nn.Conv(4, (3, 3), strides=2)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


class TinyMLP(nn.Module):
  """dense -> ReLU -> dense -> ReLU -> dense (no BatchNorm)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Dense(6)(x.reshape(x.shape[0], -1)))
    x = nn.relu(nn.Dense(5)(x))
    return nn.Dense(3)(x)


CNN_SITES = ("Conv_0", "BatchNorm_0", "Conv_1", "BatchNorm_1", "Dense_0")
MLP_SITES = ("Dense_0", "Dense_1", "Dense_2")


def _params(model, shape, seed):
  return jax.jit(model.init)(jax.random.key(seed), jnp.zeros((2, *shape)))["params"]


@pytest.fixture(scope="module")
def cnn():
  rng = np.random.default_rng(0)
  model = TinyCNN()
  x = rng.normal(size=(13, 6, 6, 2)).astype(np.float32)
  y = rng.integers(0, 3, 13).astype(np.int32)
  sets = {"clean": stack_batches(x, y, 8),  # 2 batches, the last with 3 padded rows
          "flipped": stack_batches(x[:, ::-1], y, 8)}
  bn = stack_batches(rng.normal(size=(16, 6, 6, 2)).astype(np.float32), np.zeros(16, np.int32),
                     8, drop_remainder=True)
  pa, pb = _params(model, (6, 6, 2), 0), _params(model, (6, 6, 2), 1)
  result = features.feature_connectivity(model.apply, (pa, pb), TS, sets, bn)
  return model, pa, pb, sets, bn, result


@pytest.fixture(scope="module")
def mlp():
  rng = np.random.default_rng(1)
  model = TinyMLP()
  x = rng.normal(size=(11, 2, 2, 2)).astype(np.float32)
  sets = {"eval": stack_batches(x, rng.integers(0, 3, 11).astype(np.int32), 4)}
  sets["eval"]["mask"][0, 1] = 0.5  # a fractional weight counts as such
  return model, [_params(model, (2, 2, 2), s) for s in (2, 3, 4)], sets


# ------------------------------------------------------------- independent computations


@jax.jit
def _cnn_intermediates(params, bn_images, images):
  """TinyCNN's intermediates by capture_intermediates, statistics recomputed from bn_images."""
  model = TinyCNN()
  stats = batchnorm.recompute_batch_stats(model.apply, {"params": params}, {"image": bn_images})
  _, state = model.apply({"params": params, "batch_stats": stats}, images, train=False,
                         capture_intermediates=True, mutable=["intermediates"])
  return flax.traverse_util.flatten_dict(state["intermediates"], sep="/")


def _cnn_features(params, bn_images, images):
  """{site: [N, units]} of TinyCNN, float64."""
  flat = _cnn_intermediates(params, bn_images, images)
  return {s: np.asarray(flat[f"{s}/__call__"][0], np.float64).reshape(len(images), -1)
          for s in CNN_SITES}


def _mlp_features(params, images):
  """{site: [N, units]}: the Dense outputs by a hand-written float64 forward pass."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h0 = images.reshape(len(images), -1).astype(np.float64) @ p["Dense_0"]["kernel"] + \
      p["Dense_0"]["bias"]
  h1 = np.maximum(h0, 0) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
  h2 = np.maximum(h1, 0) @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]
  return {"Dense_0": h0, "Dense_1": h1, "Dense_2": h2}


def _np_cosine(u, v):
  nu, nv = np.linalg.norm(u, axis=1), np.linalg.norm(v, axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    cos = np.sum(u * v, 1) / (nu * nv)
  return np.where((nu > 0) & (nv > 0), cos, np.where((nu == 0) & (nv == 0), 1.0, 0.0))


def _reference(features_at, point_at, ts, weights, post=lambda f: f):
  """{quantity: {site: [K]}} by a Python loop over t, in NumPy (weights per example)."""
  fa, fb = features_at(point_at(0.0)), features_at(point_at(1.0))
  out = {q: {s: [] for s in fa} for q in features.QUANTITIES}
  for t in ts:
    ft = features_at(point_at(float(t)))
    for s in fa:
      ref = (1 - t) * post(fa[s]) + t * post(fb[s])
      values = {"cosine": _np_cosine(post(ft[s]), ref),
                "agreement_a": np.mean((ft[s] > 0) == (fa[s] > 0), axis=1),
                "agreement_b": np.mean((ft[s] > 0) == (fb[s] > 0), axis=1)}
      for q, v in values.items():
        out[q][s].append(np.sum(weights * v) / np.sum(weights))
  return jax.tree.map(np.asarray, out)


def _linear(pa, pb):
  return lambda t: jax.tree.map(lambda a, b: (1 - t) * a + t * b, pa, pb)


def _flat(batches):
  """(images [N, ...], weights [N]) of stacked batches, padding included."""
  return (batches["image"].reshape(-1, *batches["image"].shape[2:]),
          batches["mask"].reshape(-1).astype(np.float64))


# ------------------------------------------------------------------------------ tests


def test_cnn_matches_a_plain_loop_on_every_set_and_site(cnn):
  model, pa, pb, sets, bn, result = cnn
  assert result.sites == CNN_SITES  # every conv, dense and BatchNorm output, in call order
  for name, batches in sets.items():
    images, weights = _flat(batches)
    ref = _reference(lambda p: _cnn_features(p, bn["image"], images), _linear(pa, pb),
                     TS, weights)
    for q in features.QUANTITIES:
      for site in CNN_SITES:
        np.testing.assert_allclose(getattr(result, q)[name][site], ref[q][site], atol=2e-6,
                                   err_msg=f"{q} {name} {site}")


def test_end_points_are_exact(cnn):
  model, pa, pb, sets, bn, result = cnn
  images, weights = _flat(sets["clean"])
  fa = _cnn_features(pa, bn["image"], images)
  fb = _cnn_features(pb, bn["image"], images)
  for site in CNN_SITES:
    np.testing.assert_allclose(np.asarray(result.cosine["clean"][site])[[0, -1]], 1.0, atol=1e-6)
    assert result.agreement_a["clean"][site][0] == pytest.approx(1.0, abs=1e-6)
    assert result.agreement_b["clean"][site][-1] == pytest.approx(1.0, abs=1e-6)
    ends = np.sum(weights * np.mean((fa[site] > 0) == (fb[site] > 0), 1)) / weights.sum()
    assert ends < 0.95  # independent inits: the check below can fail
    assert result.agreement_b["clean"][site][0] == pytest.approx(ends, abs=1e-6)
    assert result.agreement_a["clean"][site][-1] == pytest.approx(ends, abs=1e-6)
  # A conv without anything before it is linear in its parameters: LLFC holds exactly.
  np.testing.assert_allclose(result.cosine["clean"]["Conv_0"], 1.0, atol=1e-6)
  assert result.cosine["clean"]["BatchNorm_1"].min() < 0.99


def test_summary_reads_the_curves(cnn):
  result = cnn[-1]
  summary = result.summary()
  assert set(summary) == {"clean", "flipped"} and set(summary["clean"]) == set(CNN_SITES)
  cos = np.asarray(result.cosine["flipped"]["BatchNorm_1"])
  a = np.asarray(result.agreement_a["flipped"]["BatchNorm_1"])
  b = np.asarray(result.agreement_b["flipped"]["BatchNorm_1"])
  got = summary["flipped"]["BatchNorm_1"]
  assert got["cosine_min"] == pytest.approx(min(cos)) and got["cosine_min_t"] == \
      TS[np.argmin(cos)]
  assert got["endpoint_agreement"] == pytest.approx(b[0])
  assert got["agreement_min"] == pytest.approx(min(max(u, v) for u, v in zip(a, b)))
  assert all(isinstance(v, float) for v in got.values())


def test_identical_end_points_give_cosine_one_everywhere(cnn):
  model, pa, _, sets, bn, _ = cnn
  result = features.feature_connectivity(model.apply, (pa, pa), TS, sets, bn)  # compiled once
  for site in CNN_SITES:
    np.testing.assert_allclose(result.cosine["clean"][site], 1.0, atol=1e-6)
    np.testing.assert_allclose(result.agreement_a["clean"][site], 1.0, atol=1e-6)


def test_masked_examples_do_not_count(cnn):
  model, pa, pb, sets, bn, result = cnn
  changed = jax.tree.map(np.copy, sets["clean"])
  changed["image"][1, 5:] = np.random.default_rng(5).normal(size=(3, 6, 6, 2))  # the padding
  changed["mask"][0, 2] = 0.0  # a real example dropped
  again = features.feature_connectivity(model.apply, (pa, pb), TS, {**sets, "clean": changed}, bn)
  images, weights = _flat(changed)
  ref = _reference(lambda p: _cnn_features(p, bn["image"], images), _linear(pa, pb),
                   TS, weights)
  for site in CNN_SITES:
    np.testing.assert_allclose(again.cosine["clean"][site], ref["cosine"][site], atol=2e-6)
    np.testing.assert_allclose(again.agreement_b["clean"][site], ref["agreement_b"][site],
                               atol=2e-6)
  assert not np.allclose(again.cosine["clean"]["BatchNorm_1"],
                         result.cosine["clean"]["BatchNorm_1"], atol=1e-6)


def test_sites_restrict_and_keep_the_order_given(cnn):
  model, pa, pb, sets, bn, result = cnn
  only = features.feature_connectivity(model.apply, (pa, pb), TS, sets, bn,
                                       sites=["BatchNorm_1", "Conv_0"])
  assert only.sites == ("BatchNorm_1", "Conv_0")
  assert set(only.cosine["flipped"]) == {"BatchNorm_1", "Conv_0"}
  for q in features.QUANTITIES:
    np.testing.assert_allclose(getattr(only, q)["flipped"]["BatchNorm_1"],
                               getattr(result, q)["flipped"]["BatchNorm_1"], atol=1e-6)


@pytest.mark.parametrize("strategy", ["chunked", "vmap"])  # "map": the CNN tests (CPU default)
def test_mlp_on_a_bezier_path_with_post_relu(mlp, strategy):
  """The reference is the linear interpolation of the end points' features on any path."""
  model, (pa, pm, pb), sets = mlp
  result = features.feature_connectivity(model.apply, (pa, pm, pb), TS, sets, path="bezier",
                                         strategy=strategy, chunk_size=2, post=jax.nn.relu)
  assert result.sites == MLP_SITES

  def bezier(t):
    return jax.tree.map(lambda a, m, b: (1 - t)**2 * a + 2 * t * (1 - t) * m + t**2 * b,
                        pa, pm, pb)

  images, weights = _flat(sets["eval"])
  ref = _reference(lambda p: _mlp_features(p, images), bezier, TS, weights,
                   post=lambda f: np.maximum(f, 0))
  for q in features.QUANTITIES:
    for site in MLP_SITES:
      np.testing.assert_allclose(getattr(result, q)["eval"][site], ref[q][site], atol=2e-6,
                                 err_msg=f"{q} {site}")
  assert result.cosine["eval"]["Dense_1"].min() < 0.99  # the path is not trivially connected


def test_repair_reaches_the_features_it_renormalises(mlp):
  """With REPAIR the captured features are the repaired ones; the end points stay exact."""
  model, points, sets = mlp
  run = lambda **kw: features.feature_connectivity(  # as the 'vmap' test above: compiled once
      model.apply, points, TS, sets, path="bezier", strategy="vmap", chunk_size=2,
      post=jax.nn.relu, **kw)
  full = jax.tree.map(lambda a: a[:2], sets["eval"])  # the two full batches
  plain, repaired = run(), run(bn_batches=full, renormalize="repair")
  assert repaired.sites == plain.sites == MLP_SITES
  for site in MLP_SITES:
    np.testing.assert_allclose(np.asarray(repaired.cosine["eval"][site])[[0, -1]], 1.0,
                               atol=1e-5)
  assert not np.allclose(repaired.cosine["eval"]["Dense_1"], plain.cosine["eval"]["Dense_1"],
                         atol=1e-3)


def test_unknown_site_names_the_available_ones(cnn):
  model, pa, pb, sets, bn, _ = cnn
  with pytest.raises(ValueError, match=r"unknown sites \['Conv_9'\].*'Conv_0', 'BatchNorm_0'"):
    features.feature_connectivity(model.apply, (pa, pb), TS, sets, bn, sites=["Conv_9"])
  with pytest.raises(ValueError, match=r"unknown sites \(none given\)"):
    features.feature_connectivity(model.apply, (pa, pb), TS, sets, bn, sites=[])
  with pytest.raises(TypeError, match="sites must be a list of site names"):
    features.feature_connectivity(model.apply, (pa, pb), TS, sets, bn, sites="Conv_0")


def test_bad_inputs_raise_named_errors(cnn):
  model, pa, pb, sets, bn, _ = cnn
  with pytest.raises(ValueError, match="grid"):
    features.feature_connectivity(model.apply, (pa, pb), [0.0, 0.5], sets, bn)
  with pytest.raises(ValueError, match="needs bn_batches"):
    features.feature_connectivity(model.apply, (pa, pb), TS, sets)
  with pytest.raises(ValueError, match="full variables"):
    features.feature_connectivity(model.apply, ({"params": pa}, {"params": pb}), TS, sets, bn)
  with pytest.raises(ValueError, match=r"eval set 'clean' lacks keys \['mask'\]"):
    features.feature_connectivity(model.apply, (pa, pb), TS,
                                  {"clean": {"image": sets["clean"]["image"],
                                             "label": sets["clean"]["label"]}}, bn)
  bad = jax.tree.map(np.copy, pa)
  bad["Conv_1"]["kernel"][0, 0, 0, 0] = np.nan
  with pytest.raises(finite.NonFiniteError, match="path point 0"):
    features.feature_connectivity(model.apply, (bad, pb), TS, sets, bn)


def test_overflowing_statistics_are_refused(cnn):
  model, pa, pb, sets, bn, _ = cnn
  huge = jax.tree.map(np.copy, pa)
  huge["Conv_0"]["kernel"] *= 1e30  # finite parameters whose activations' variance overflows
  with pytest.raises(finite.NonFiniteError, match=r"BatchNorm statistics at t = 0, 0\.25"):
    features.feature_connectivity(model.apply, (huge, pb), TS, sets, bn)
