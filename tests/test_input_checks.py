"""Inputs that would give a wrong number are refused where they enter the library, named."""

import dataclasses
import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechconn import barriers, counterfactual, evaluation, finite, input_checks, objectives
from mechconn.data.batching import stack_batches
from mechconn.models import get_model

TS = np.linspace(0, 1, 3)


@pytest.fixture(scope="module")
def cnn():
  """A BatchNorm CNN (4 classes, 8x8x3), two inits, normalised eval and statistics batches."""
  rng = np.random.default_rng(0)
  model = get_model("small_cnn", 4, width=4)
  x = rng.normal(size=(32, 8, 8, 3)).astype(np.float32)
  y = rng.integers(0, 4, size=32).astype(np.int32)
  va, vb = (model.init(jax.random.key(k), x[:2]) for k in (0, 1))
  return (model, va, vb["params"], stack_batches(x, y, 16),
          stack_batches(x, y, 16, drop_remainder=True))


# Dense layers only: REPAIR sites Dense_0 and Dense_1 (the logits' Dense_2 is not one).
from test_repair import TinyMLP  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="module")
def mlp():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(32, 2, 2, 3)).astype(np.float32)
  y = rng.integers(0, 3, size=32).astype(np.int32)
  model = TinyMLP()
  pa, pb = (model.init(jax.random.key(k), x[:2])["params"] for k in (0, 1))
  return model, pa, pb, stack_batches(x, y, 16), stack_batches(x, y, 16, drop_remainder=True)


def _views(batches):
  return {"clean": batches}


def _evaluate_variables(apply_fn, variables, batches):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    return evaluation.evaluate_variables(apply_fn, variables, batches)


# ---------------------------------------------------------------- 1. images: dtype and scale


def test_integer_images_are_refused_before_any_compute(cnn):
  model, va, pb, ev, bn = cnn
  uint8 = {**ev, "image": np.clip(ev["image"] * 60 + 128, 0, 255).astype(np.uint8)}
  message = r"\['image'\] has dtype uint8; expected floating-point images.*x / 255"
  with pytest.raises(ValueError, match=r"eval set 'eval'" + message):
    barriers.evaluate_path(model.apply, (va["params"], pb), TS, uint8, bn_batches=bn)
  with pytest.raises(ValueError, match=r"bn_batches" + message):
    barriers.evaluate_path(model.apply, (va["params"], pb), TS, ev,
                           bn_batches={"image": uint8["image"][:2]})
  with pytest.raises(ValueError, match=r"view 'clean'" + message + r".*inputs='pixels'"):
    counterfactual.evaluate_views(model.apply, va, _views(uint8))
  with pytest.raises(ValueError, match=message):
    _evaluate_variables(model.apply, va, uint8)


def test_float_images_on_the_uint8_scale_are_refused_with_the_range_found(cnn):
  model, va, pb, ev, bn = cnn
  scale255 = {**ev, "image": np.round(np.clip(ev["image"] * 60 + 128, 0, 255))}
  expected = (r"range over \[0, 255\]; expected normalised images within \[-32, 32\].*"
              r"divide by 255 and normalise.*inputs='pixels'")
  with pytest.raises(ValueError, match=r"the images of eval set 'eval' " + expected):
    barriers.evaluate_path(model.apply, (va["params"], pb), TS, scale255, bn_batches=bn)
  with pytest.raises(ValueError, match=r"the BatchNorm images \(bn_batches\) " + expected):
    barriers.evaluate_path(model.apply, (va["params"], pb), TS, ev,
                           bn_batches={"image": scale255["image"][:2]})
  with pytest.raises(ValueError, match=r"the images of eval set 'clean' " + expected):
    counterfactual.evaluate_views(model.apply, va, _views(scale255))


def test_raw_pixels_under_another_key_and_integer_tokens_are_not_images(cnn):
  model, va, _, ev, _ = cnn
  pixels = np.clip(ev["image"] * 60 + 128, 0, 255).astype(np.uint8)
  raw = dataclasses.replace(objectives.CLASSIFICATION, inputs="pixels")

  def normalising(variables, x, **kw):  # a model that normalises its own inputs
    return model.apply(variables, (x.astype(jnp.float32) - 128) / 60, **kw)

  got = counterfactual.evaluate_views(
      normalising, va, {"raw": {"pixels": pixels, "label": ev["label"], "mask": ev["mask"]}},
      objective=raw)["raw"]
  want = counterfactual.evaluate_views(
      model.apply, va, {"clean": {**ev, "image": (pixels.astype(np.float32) - 128) / 60}})
  np.testing.assert_allclose(got["loss"], want["clean"]["loss"], rtol=1e-5)

  class Bigram(nn.Module):  # next-token logits from integer tokens
    @nn.compact
    def __call__(self, tokens, train: bool = False):
      return nn.Dense(5)(nn.Embed(5, 4)(tokens))

  tokens = np.random.default_rng(0).integers(0, 5, size=(2, 4, 6)).astype(np.int32)
  lm = Bigram()
  variables = lm.init(jax.random.key(0), tokens[0])
  out = counterfactual.evaluate_views(lm.apply, variables,
                                      {"text": {"tokens": tokens, "mask": np.ones_like(tokens)}},
                                      objective=objectives.next_token())
  assert np.isfinite(out["text"]["loss"]) and 0 <= out["text"]["accuracy"] <= 1


# ---------------------------------------------------------------- 2. stored variances


def test_a_negative_or_nan_stored_variance_is_refused_naming_the_leaf(cnn):
  model, va, _, ev, _ = cnn
  stats = jax.tree.map(np.array, va["batch_stats"])
  stats["BatchNorm_1"]["var"][2] = -0.5  # e.g. from an imported checkpoint
  negative = {"params": va["params"], "batch_stats": stats}
  message = r"batch_stats leaf 'BatchNorm_1/var' holds a negative variance \(min -0.5\)"
  with pytest.raises(ValueError, match=message):
    counterfactual.evaluate_views(model.apply, negative, _views(ev))
  with pytest.raises(ValueError, match=message):
    _evaluate_variables(model.apply, negative, ev)
  stats["BatchNorm_1"]["var"][2] = np.nan
  with pytest.raises(finite.NonFiniteError,
                     match=r"the model's batch_stats \(first at leaf 'BatchNorm_1/var'\)"):
    counterfactual.evaluate_views(model.apply, {**negative, "batch_stats": stats}, _views(ev))


# ---------------------------------------------------------------- 3. statistics from constant data


def test_repair_statistics_from_zero_or_constant_images_are_refused(mlp):
  model, pa, pb, ev, bn = mlp
  for value in (0.0, 0.7):
    constant = {"image": np.full_like(bn["image"], value)}
    with pytest.raises(ValueError, match=r"zero variance at REPAIR site 'Dense_0' of path point "
                                         r"0 \(t = 0\) and path point 1 \(t = 1\).*real training"):
      barriers.evaluate_path(model.apply, (pa, pb), TS, ev, bn_batches=constant,
                             renormalize="repair")
  # The pure core stays jittable and carries the flags the eager wrapper reads.
  core = jax.jit(lambda a, b, images: barriers.path_metrics(
      model.apply, (a, b), TS, {"eval": ev}, {"image": images}, renormalize="repair")["eval"])
  flags = core(pa, pb, np.zeros_like(bn["image"])).statistics_vary
  assert sorted(flags) == ["Dense_0", "Dense_1"] and not np.asarray(flags["Dense_0"]).any()
  assert np.asarray(core(pa, pb, bn["image"]).statistics_vary["Dense_0"]).all()
  result = barriers.evaluate_path(model.apply, (pa, pb), TS, ev, bn_batches=bn,
                                  renormalize="repair")
  assert all(np.asarray(v).all() for v in result.statistics_vary.values())


def test_batchnorm_statistics_from_zero_images_are_refused(cnn):
  model, va, pb, ev, bn = cnn
  zeros = {"image": np.zeros_like(bn["image"])}
  with pytest.raises(ValueError, match=r"zero variance at BatchNorm layer 'BatchNorm_0' of path "
                                       r"point 0 \(t = 0\) and path point 1 \(t = 1\)"):
    barriers.evaluate_path(model.apply, (va["params"], pb), TS, ev, bn_batches=zeros)


# ---------------------------------------------------------------- 4. the deprecated evaluation


def test_evaluate_variables_runs_the_checks_of_evaluate_views(cnn):
  model, va, _, ev, _ = cnn
  nan = {**ev, "image": np.array(ev["image"])}
  nan["image"][1, 3, 0, 0, 0] = np.nan
  with pytest.raises(finite.NonFiniteError, match=r"the images of eval set 'eval'"):
    _evaluate_variables(model.apply, va, nan)
  with pytest.raises(ValueError, match=r"full variables"):
    _evaluate_variables(model.apply, va["params"], ev)
  loss, accuracy = _evaluate_variables(model.apply, va, ev)
  views = counterfactual.evaluate_views(model.apply, va, _views(ev))["clean"]
  np.testing.assert_allclose([loss, accuracy], [views["loss"], views["accuracy"]], rtol=1e-6)
  # mean_metrics is the pure function: jittable, unchecked (a NaN image still gives numbers).
  means = jax.jit(evaluation.mean_metrics, static_argnums=0)(model.apply, va, nan)
  assert set(means) == {"loss", "accuracy"}


# ---------------------------------------------------------------- 5. model outputs


def test_a_model_returning_logits_and_features_is_refused_with_what_it_returned(cnn):
  model, va, pb, ev, bn = cnn
  both = functools.partial(model.apply, return_features=True)
  message = (r"the model returns \(float32\[16, 4\], float32\[16, 16\]\) for inputs "
             r"float32\[16, 8, 8, 3\], but objective 'classification' expects one array of "
             r"logits \[batch, classes\].*def apply_fn")
  with pytest.raises(ValueError, match=r"evaluate_views: " + message):
    counterfactual.evaluate_views(both, va, _views(ev))
  with pytest.raises(ValueError, match=r"evaluate_path: " + message):
    barriers.evaluate_path(both, (va["params"], pb), TS, ev, bn_batches=bn)
  with pytest.raises(ValueError, match=r"path_metrics: " + message):
    barriers.path_metrics(both, (va["params"], pb), TS, {"eval": ev}, bn)

  def apply_fn(variables, x, **kw):  # the adapter the message suggests
    out = both(variables, x, **kw)
    return (out[0][0], out[1]) if kw.get("mutable") else out[0]

  adapted = counterfactual.evaluate_views(apply_fn, va, _views(ev))["clean"]
  plain = counterfactual.evaluate_views(model.apply, va, _views(ev))["clean"]
  np.testing.assert_allclose(adapted["loss"], plain["loss"], rtol=1e-6)


# ---------------------------------------------------------------- 6. dtypes of the points


def test_points_of_different_dtypes_are_refused_naming_both(cnn):
  model, va, pb, ev, bn = cnn
  pa = va["params"]
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), pb)
  message = (r"path point 1 holds bfloat16 where point 0 holds float32 \(first at leaf "
             r"'BatchNorm_0/bias'\).*x\.astype")
  with pytest.raises(ValueError, match=r"evaluate_path: " + message):
    barriers.evaluate_path(model.apply, (pa, half), TS, ev, bn_batches=bn)
  with pytest.raises(ValueError, match=r"path_metrics: " + message):
    barriers.path_metrics(model.apply, (pa, half), TS, {"eval": ev}, bn)
  with pytest.raises(ValueError, match=r"path point 1 holds bfloat16 where point 0 holds float32"):
    barriers.evaluate_path(model.apply, (pa, half, pb), TS, ev, bn_batches=bn, path="bezier")


# ---------------------------------------------------------------- valid inputs pass


def test_normalised_images_pass_every_check(cnn):
  model, va, pb, ev, bn = cnn
  result = barriers.evaluate_path(model.apply, (va["params"], pb), TS, ev, bn_batches=bn)
  assert np.isfinite(np.asarray(result.loss)).all()
  assert sorted(result.statistics_vary) == ["BatchNorm_0", "BatchNorm_1", "BatchNorm_2"]
  in_range = {**ev, "image": np.clip(ev["image"] * 10, -input_checks.MAX_ABS_IMAGE,
                                     input_checks.MAX_ABS_IMAGE)}
  out = counterfactual.evaluate_views(model.apply, va, _views(in_range))
  assert np.isfinite(out["clean"]["loss"])


def test_recompute_batch_stats_refuses_integer_images():
  from mechconn import batchnorm  # pylint: disable=g-import-not-at-top
  model = get_model("small_cnn", 3, width=4)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  images = np.zeros((1, 4, 8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match=r"batches\['image'\] has dtype uint8; expected "
                                       r"floating-point images"):
    batchnorm.recompute_batch_stats(model.apply, variables, {"image": images})
