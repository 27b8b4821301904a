"""Evaluating a model on the four views equals a plain per-example loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechconn import barriers
from mechconn import counterfactual
from mechconn import finite
from mechconn.data import datasets, views
from mechconn.models import get_model


def test_view_metrics_match_a_numpy_loop():
  x, y = datasets.load_base("shapes10", "test", num_examples=50)
  test_views = views.box_views(datasets.normalize(x), y, 10, seed=0)
  model = get_model("small_cnn", 10, width=4)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  # Perturb the running statistics so inference-mode BatchNorm is exercised.
  variables = {"params": variables["params"],
               "batch_stats": jax.tree.map(lambda s: s + 0.3, variables["batch_stats"])}
  batches = counterfactual.stack_views(test_views, y, batch_size=16)  # 4 batches, last padded
  assert batches["cue"]["image"].shape == (4, 16, 32, 32, 3)
  results = jax.device_get(counterfactual.evaluate_views(model.apply, variables, batches))
  assert set(results) == set(views.VIEWS)
  one_image = jax.jit(lambda image: model.apply(variables, image[None])[0])
  for name, images in test_views.items():
    losses, correct = [], []
    for i in range(len(y)):  # one image at a time, float64 on the host
      logits = np.asarray(one_image(images[i]), np.float64)
      log_z = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
      losses.append(log_z - logits[y[i]])
      correct.append(np.argmax(logits) == y[i])
    np.testing.assert_allclose(results[name]["loss"], np.mean(losses), rtol=1e-4)
    np.testing.assert_allclose(results[name]["accuracy"], np.mean(correct), atol=1e-6)


def test_unknown_view_is_refused():
  with pytest.raises(ValueError, match="valid views"):
    counterfactual.stack_views({"grey": np.zeros((2, 4, 4, 3))}, np.zeros(2, int), 2)


def test_table_lists_views_in_order():
  table = counterfactual.format_view_table(
      {v: {"loss": 1.0, "accuracy": 0.5} for v in reversed(views.VIEWS)}, "title")
  assert [line.split()[0] for line in table.splitlines()[2:]] == list(views.VIEWS)


def test_path_views_equal_one_path_per_view_and_the_verdict_reads_them():
  x, y = datasets.load_base("shapes10", "test", num_examples=40)
  test_views = views.box_views(datasets.normalize(x), y, 10, seed=0)
  model = get_model("small_cnn", 10, width=4)
  a, b = (model.init(jax.random.key(k), jnp.zeros((1, 32, 32, 3)))["params"] for k in (0, 1))
  batches = counterfactual.stack_views(test_views, y, batch_size=16)
  bn = {"image": datasets.normalize(x[:32]).reshape(2, 16, 32, 32, 3)}
  ts = np.linspace(0, 1, 4)
  together = barriers.evaluate_path_on_sets(model.apply, (a, b), ts, batches, bn_batches=bn)
  assert set(together) == set(views.VIEWS)
  for name in views.VIEWS:
    alone = barriers.evaluate_path(model.apply, (a, b), ts, batches[name], bn_batches=bn)
    np.testing.assert_allclose(together[name].loss, alone.loss, rtol=1e-5)
    np.testing.assert_allclose(together[name].accuracy, alone.accuracy, atol=1e-6)
  verdict = counterfactual.path_verdict(together)
  assert verdict["barriers"] == {name: r.summary() for name, r in together.items()}


def test_verdict_by_hand():
  ts = jnp.linspace(0, 1, 5)
  flat = barriers.PathEval.classification(ts=ts, loss=jnp.ones(5), accuracy=jnp.full(5, 0.9))
  dip = barriers.PathEval.classification(ts=ts, loss=jnp.asarray([1.0, 1.5, 3.0, 1.2, 1.0]),
                                         accuracy=jnp.asarray([0.9, 0.8, 0.3, 0.85, 0.7]))
  verdict = counterfactual.path_verdict({"clean": flat, "cue": dip, "rand_cue": flat})
  assert verdict["broken_views"] == ["cue"] and not verdict["mechanistically_connected"]
  # error chord at t = 0.5 is (0.1 + 0.3) / 2 = 0.2; error there 0.7: barrier 0.5.
  assert verdict["barriers"]["cue"]["error"] == pytest.approx(0.5)
  assert verdict["barriers"]["cue"]["error_t"] == 0.5
  assert verdict["barriers"]["cue"]["loss"] == pytest.approx(2.0)
  assert verdict["barriers"]["clean"]["error"] == pytest.approx(0.0, abs=1e-7)
  lenient = counterfactual.path_verdict({"cue": dip}, metric="loss", tolerance=2.5)
  assert lenient["mechanistically_connected"] and lenient["metric"] == "loss"
  with pytest.raises(ValueError, match="valid: \\['error', 'loss'\\]"):
    counterfactual.path_verdict({"cue": dip}, metric="accuracy")
  nan = barriers.PathEval.classification(ts=ts, loss=jnp.asarray([1.0, jnp.nan, 1.0, 1.0, 1.0]),
                                         accuracy=jnp.full(5, 0.9))
  with pytest.raises(finite.NonFiniteError, match=r"barriers on views \['cue'\] are not finite"):
    counterfactual.path_verdict({"clean": flat, "cue": nan})  # was: "connected"
  # A set under another name is judged too (was: ignored, and "connected").
  assert counterfactual.path_verdict({"eval": dip})["broken_views"] == ["eval"]
  with pytest.raises(ValueError, match="results is empty"):
    counterfactual.path_verdict({})
  with pytest.raises(ValueError, match=r"tolerance=nan must be a finite number >= 0"):
    counterfactual.path_verdict({"cue": dip}, tolerance=float("nan"))


def test_views_of_non_finite_variables_or_images_are_named_errors():
  x, y = datasets.load_base("shapes10", "test", num_examples=20)
  test_views = views.box_views(datasets.normalize(x), y, 10, seed=0)
  model = get_model("small_cnn", 10, width=4)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  batches = counterfactual.stack_views(test_views, y, batch_size=8)
  nan_stats = {**variables, "batch_stats": jax.tree.map(lambda s: s * np.nan,
                                                        variables["batch_stats"])}
  with pytest.raises(finite.NonFiniteError, match="the model's batch_stats"):
    counterfactual.evaluate_views(model.apply, nan_stats, batches)
  image = np.array(batches["rand_img"]["image"])
  image[1, 2, 3, 4, 0] = np.inf
  bad = {**batches, "rand_img": {**batches["rand_img"], "image": image}}
  with pytest.raises(finite.NonFiniteError, match="images of eval set 'rand_img'"):
    counterfactual.evaluate_views(model.apply, variables, bad)
  wrong = {**batches, "cue": {**batches["cue"], "label": batches["cue"]["label"] + 10}}
  with pytest.raises(ValueError, match=r"eval set 'cue' has labels outside \[0, 10\)"):
    counterfactual.evaluate_views(model.apply, variables, wrong)
