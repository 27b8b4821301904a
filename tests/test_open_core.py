"""The pure path core on any model and objective: jit, grad and vmap; objectives by definition."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mechconn import adapters, barriers, evaluation, objectives, paths
from mechconn.data.batching import stack_batches
from mechconn.models import get_model

TS = np.linspace(0, 1, 5)


class Regressor(nn.Module):
  """A user's regression MLP: no `train` argument, two outputs."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(nn.tanh(nn.Dense(16)(x)))


def huber_objective():
  """A user-written objective: Huber loss of two outputs against 'y' (a module-level function)."""
  return objectives.Objective(name="huber", metrics=_huber, inputs="x", target_keys=("y",))


def _huber(outputs, batch):
  return {"huber": optax.huber_loss(outputs, batch["y"]).mean(-1)}


@pytest.fixture(scope="module")
def regression():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 8, 3)).astype(np.float32)
  y = np.stack([np.sin(x.sum(-1)), x[..., 0] * x[..., 1]], -1).astype(np.float32)
  mask = np.ones((4, 8), np.float32)
  mask[-1, 5:] = 0  # a padded last batch
  y[-1, 5:] = 1e3   # whose targets must not count
  batches = {"x": x, "y": y, "mask": mask}
  model = Regressor()
  points = [model.init(jax.random.key(k), x[0])["params"] for k in (0, 1, 2, 3, 4, 5)]
  return adapters.without_train(model.apply), batches, points


def test_jit_of_the_core_with_a_user_objective_equals_eager_evaluate_path(regression):
  apply_fn, batches, (a, b, *_) = regression
  huber = huber_objective()
  eager = barriers.evaluate_path(apply_fn, (a, b), TS, batches, objective=huber)

  @jax.jit
  def core(a, b):
    return barriers.path_metrics(apply_fn, (a, b), TS, {"eval": batches}, objective=huber)

  jitted = core(a, b)["eval"]
  np.testing.assert_allclose(jitted.metrics["huber"], eager.metrics["huber"], rtol=1e-6)
  # Against the definition: the mean over real rows of the Huber loss at each t.
  real = batches["mask"] > 0
  for i, t in enumerate(TS):
    out = apply_fn({"params": paths.linear(a, b, t)}, batches["x"])
    expected = np.asarray(optax.huber_loss(out, batches["y"]).mean(-1))[real].mean()
    assert float(eager.metrics["huber"][i]) == pytest.approx(float(expected), rel=1e-5)
  summary = eager.summary()
  assert set(summary) == {"huber", "huber_t"}
  assert summary["huber"] == pytest.approx(
      float(barriers.barrier_height(TS, eager.metrics["huber"])))


def directional_derivatives(fn, point, seed, eps):
  """(grad(fn)(point) . d, the central difference of fn along d) for a random direction d."""
  grad = jax.jit(jax.grad(fn))(point)
  direction = jax.tree.map(lambda x: jax.random.normal(jax.random.key(seed), x.shape), point)
  shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, point, direction)
  numeric = (float(fn(shifted(1))) - float(fn(shifted(-1)))) / (2 * eps)
  analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad),
                                                        jax.tree.leaves(direction)))
  return analytic, numeric


def test_grad_of_the_mean_path_loss_matches_finite_differences(regression):
  apply_fn, batches, (a, b, *_) = regression
  objective = objectives.regression(inputs="x", target="y")

  def mean_loss(a):
    out = barriers.path_metrics(apply_fn, (a, b), TS, {"eval": batches}, objective=objective)
    return out["eval"].metrics["squared_error"].mean()

  analytic, numeric = directional_derivatives(mean_loss, a, seed=7, eps=1e-3)
  assert analytic == pytest.approx(numeric, rel=2e-2)
  assert abs(analytic) > 1e-3  # a real gradient, not zero


def test_vmap_over_stacked_pairs_equals_separate_calls(regression):
  apply_fn, batches, points = regression
  pairs = [(points[0], points[1]), (points[2], points[3]), (points[4], points[5])]
  objective = objectives.regression(inputs="x", target="y")

  def losses(a, b):
    out = barriers.path_metrics(apply_fn, (a, b), TS, {"eval": batches}, objective=objective)
    return out["eval"].metrics["squared_error"]

  stacked = [jax.tree.map(lambda *x: jnp.stack(x), *[p[i] for p in pairs]) for i in (0, 1)]
  together = jax.jit(jax.vmap(losses))(*stacked)
  assert together.shape == (3, len(TS))
  for i, (a, b) in enumerate(pairs):
    np.testing.assert_allclose(together[i], losses(a, b), rtol=1e-6)


@pytest.fixture(scope="module")
def bn_cnn():
  rng = np.random.default_rng(1)
  model = get_model("small_cnn", 4, width=4)
  x = rng.normal(size=(48, 8, 8, 3)).astype(np.float32)
  y = rng.integers(0, 4, size=48).astype(np.int32)
  pa, pb = (model.init(jax.random.key(k), x[:2])["params"] for k in (0, 1))
  return model, pa, pb, stack_batches(x, y, 16), stack_batches(x[:32], y[:32], 16,
                                                               drop_remainder=True)


@pytest.mark.parametrize("strategy", [  # 'map' in the fast loop; every strategy in the suite
    s if s == "map" else pytest.param(s, marks=pytest.mark.slow) for s in barriers.STRATEGIES])
def test_the_core_under_jit_equals_evaluate_path_with_batchnorm(bn_cnn, strategy):
  model, pa, pb, eval_batches, bn_batches = bn_cnn
  eager = barriers.evaluate_path(model.apply, (pa, pb), TS, eval_batches, bn_batches=bn_batches,
                                 strategy=strategy)
  core = jax.jit(lambda a, b: barriers.path_metrics(
      model.apply, (a, b), TS, {"eval": eval_batches}, bn_batches, strategy=strategy))
  out = core(pa, pb)["eval"]
  np.testing.assert_allclose(out.loss, eager.loss, rtol=1e-6)
  np.testing.assert_allclose(out.accuracy, eager.accuracy, atol=1e-7)
  assert bool(np.all(out.statistics_finite))


@pytest.mark.slow  # compiles the gradient of a BatchNorm path program (about 15 s)
def test_grad_through_batchnorm_recomputation_matches_finite_differences(bn_cnn):
  model, pa, pb, eval_batches, bn_batches = bn_cnn
  ts = np.linspace(0, 1, 3)

  def mean_loss(b):
    return barriers.path_metrics(model.apply, (pa, b), ts, {"eval": eval_batches},
                                 bn_batches)["eval"].loss.mean()

  analytic, numeric = directional_derivatives(mean_loss, pb, seed=3, eps=1e-2)
  assert analytic == pytest.approx(numeric, rel=5e-2, abs=1e-4)


def test_mean_metrics_equal_the_definition_for_each_built_in_objective():
  rng = np.random.default_rng(2)
  # next-token: logits from a fixed table by previous token; padding weights 0.
  vocab, length = 5, 6
  table = jnp.asarray(rng.normal(size=(vocab, vocab)).astype(np.float32))
  apply_fn = adapters.without_train(lambda v, tokens: v["params"]["table"][tokens])
  tokens = rng.integers(0, vocab, size=(3, 4, length)).astype(np.int32)
  mask = (rng.random(size=(3, 4, length)) > 0.3).astype(np.float32)
  batches = {"tokens": tokens, "mask": mask}
  means = evaluation.mean_metrics(apply_fn, {"params": {"table": table}}, batches,
                                  objectives.next_token())
  logits = np.asarray(table)[tokens[..., :-1]]
  targets, weights = tokens[..., 1:], mask[..., 1:]
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  assert float(means["loss"]) == pytest.approx((ce * weights).sum() / weights.sum(), rel=1e-5)
  correct = (logits.argmax(-1) == targets)
  assert float(means["accuracy"]) == pytest.approx((correct * weights).sum() / weights.sum())
  # regression: the mean over real examples of the per-example mean squared error.
  out = rng.normal(size=(2, 3, 4)).astype(np.float32)
  target = rng.normal(size=(2, 3, 4)).astype(np.float32)
  reg_mask = np.array([[1, 1, 1], [1, 0, 0]], np.float32)
  means = evaluation.mean_metrics(adapters.without_train(lambda v, x: x), {"params": {}},
                                  {"x": out, "target": target, "mask": reg_mask},
                                  objectives.regression())
  per_example = ((out - target) ** 2).mean(-1)
  assert float(means["squared_error"]) == pytest.approx(per_example[reg_mask > 0].mean(),
                                                        rel=1e-6)
  assert float(means["absolute_error"]) == pytest.approx(
      np.abs(out - target).mean(-1)[reg_mask > 0].mean(), rel=1e-6)


def test_higher_is_better_metric_barrier_is_its_drop_below_the_chord():
  ts = np.linspace(0, 1, 3)
  result = barriers.PathEval(ts=ts, metrics={"r2": np.array([0.9, 0.5, 0.7])},
                             higher_is_better=("r2",))
  # chord at 0.5 is 0.8; the value 0.5 is 0.3 below it.
  assert result.summary()["r2"] == pytest.approx(0.3)
  classification = barriers.PathEval.classification(ts, np.array([1.0, 2.0, 1.0]),
                                                    np.array([0.9, 0.5, 0.9]))
  assert list(classification.summary()) == ["loss", "loss_t", "error", "error_t"]
  assert classification.summary()["error"] == pytest.approx(0.4)


def test_wrong_kinds_of_arguments_are_named(bn_cnn, regression):
  model, pa, pb, eval_batches, bn_batches = bn_cnn
  variables = {"params": pa, "batch_stats": {}}
  with pytest.raises(ValueError, match=r"point 0 holds the full variables.*variables\['params'\]"):
    barriers.evaluate_path(model.apply, (variables, pb), TS, eval_batches, bn_batches=bn_batches)
  with pytest.raises(TypeError, match="objective must be a mechconn.objectives.Objective"):
    barriers.evaluate_path(model.apply, (pa, pb), TS, eval_batches, bn_batches=bn_batches,
                           objective="classification")
  with pytest.raises(ValueError, match=r"lacks keys \['x', 'target'\]"):
    barriers.evaluate_path(model.apply, (pa, pb), TS, eval_batches, bn_batches=bn_batches,
                           objective=objectives.regression())
  _, batches, (a, b, *_) = regression
  with pytest.raises(TypeError, match=r"takes no `train` argument.*without_train"):
    barriers.evaluate_path(Regressor().apply, (a, b), TS, batches,
                           objective=objectives.regression(inputs="x", target="y"))


def test_several_sets_passed_to_evaluate_path_still_work_with_a_deprecation_warning(bn_cnn):
  model, pa, pb, eval_batches, bn_batches = bn_cnn
  with pytest.warns(DeprecationWarning, match="evaluate_path_on_sets"):
    old = barriers.evaluate_path(model.apply, (pa, pb), TS, {"a": eval_batches},
                                 bn_batches=bn_batches)
  new = barriers.evaluate_path_on_sets(model.apply, (pa, pb), TS, {"a": eval_batches},
                                       bn_batches=bn_batches)
  assert isinstance(old, dict)
  np.testing.assert_array_equal(old["a"].loss, new["a"].loss)
  with pytest.warns(DeprecationWarning, match="mean_metrics"):
    loss, accuracy = evaluation.evaluate_variables(
        model.apply, {"params": pa, "batch_stats": jax.tree.map(
            lambda x: x, model.init(jax.random.key(0), eval_batches["image"][0])["batch_stats"])},
        eval_batches)
  assert np.isfinite(float(loss)) and 0 <= float(accuracy) <= 1


def test_classification_metrics_are_cross_entropy_and_argmax_by_definition():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 4)).astype(jnp.bfloat16)
  labels = jnp.array([[0, 1, 2, 3, 0], [3, 3, 1, 0, 2]])
  per = objectives.classification_metrics(logits, labels)
  x = np.asarray(logits, np.float64)
  log_softmax = x - x.max(-1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
  want = -np.take_along_axis(log_softmax, np.asarray(labels)[..., None], -1)[..., 0]
  assert per["loss"].dtype == per["accuracy"].dtype == jnp.float32
  np.testing.assert_allclose(per["loss"], want, rtol=1e-5)
  np.testing.assert_array_equal(per["accuracy"], x.argmax(-1) == np.asarray(labels))
  means = objectives.mean_classification_metrics(logits, labels)
  np.testing.assert_allclose(means["loss"], want.mean(), rtol=1e-5)
  assert means["accuracy"] == np.float32(np.mean(x.argmax(-1) == np.asarray(labels)))
