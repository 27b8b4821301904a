"""Evaluating a model on the four views equals a plain per-example loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechconn import counterfactual
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
  for name, images in test_views.items():
    losses, correct = [], []
    for i in range(len(y)):
      logits = np.asarray(model.apply(variables, images[i:i + 1]), np.float64)[0]
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
