"""The theory task (claim C13): pairs, activation-pattern agreement, the record."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import theory as theory_config
from mechconn import tasks
from mechconn.models import get_model
from mechconn.tasks import theory


def test_sign_agreement_is_the_fraction_of_shared_relu_patterns():
  model = get_model("mlp", 2, hidden=(7,))
  x = np.random.default_rng(0).normal(size=(50, 10)).astype(np.float32)
  p = model.init(jax.random.key(0), jnp.asarray(x[:1]))["params"]
  q = model.init(jax.random.key(1), jnp.asarray(x[:1]))["params"]
  assert theory.sign_agreement(model, p, p, x) == 1.0
  flipped = jax.tree.map(lambda a: a, p)
  flipped["Dense_0"] = {k: -v for k, v in p["Dense_0"].items()}
  assert theory.sign_agreement(model, p, flipped, x) == 0.0  # no pre-activation is exactly 0
  pre = lambda params: x @ np.asarray(params["Dense_0"]["kernel"]) + np.asarray(
      params["Dense_0"]["bias"])
  expected = np.mean((pre(p) > 0) == (pre(q) > 0))
  assert abs(theory.sign_agreement(model, p, q, x) - expected) < 1e-12


def test_pairs_are_every_same_attribute_pair_and_one_different_per_seed():
  pairs = theory.pairs_of(3)
  kinds = [k for k, _, _ in pairs]
  assert kinds.count("same: linear") == kinds.count("same: complex") == 3
  assert [(a, b) for k, a, b in pairs if k == "different"] == [
      (("linear", i), ("complex", i)) for i in range(3)]


def test_theory_quicktest_records_every_pair_and_its_summary(tmp_path):
  record = tasks.run(theory_config.get_config("quicktest"), str(tmp_path / "c13"))
  assert len(record["networks"]) == 4 and len(record["pairs"]) == 4
  for net in record["networks"]:  # each learns its own attribute above chance
    own = f"{net['relies_on']}_only"
    assert net["test_accuracy"][own] > 0.6, net
  for pair in record["pairs"]:
    for how in theory.ALIGNMENTS:
      for summary in pair[how]["barriers"].values():
        assert np.isfinite(summary["loss"]) and summary["loss"] >= 0
      assert 0 <= pair[how]["sign_agreement"] <= 1
  diff = [p["weight"]["barriers"]["both"]["loss"] for p in record["pairs"]
          if p["kind"] == "different"]
  assert record["summary"]["different"]["weight"]["loss/both"]["mean"] == np.mean(diff)
  assert (tmp_path / "c13" / theory.RESULT_FILE).exists()
