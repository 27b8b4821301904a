"""Layer-wise barriers against the definition: a Python loop over groups, modes, anchors and t."""

import jax
import numpy as np
import optax
import pytest

from mechconn import align, batchnorm, finite, path_core
from mechconn.data.batching import stack_batches
from mechconn.diagnostics import groups as groups_lib
from mechconn.diagnostics import layerwise
from mechconn.models import get_model

TS = np.linspace(0, 1, 4)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  model = get_model("small_cnn", 4, width=4)
  x = rng.normal(size=(40, 8, 8, 3)).astype(np.float32)
  y = rng.integers(0, 4, size=40).astype(np.int32)
  pa = model.init(jax.random.key(0), x[:2])["params"]
  pb = model.init(jax.random.key(1), x[:2])["params"]
  eval_batches = stack_batches(x, y, 16)  # the last batch is padded
  bn_batches = stack_batches(x[:32], y[:32], 16, drop_remainder=True)
  return model, pa, pb, x, y, eval_batches, bn_batches


@pytest.fixture(scope="module")
def result(setup):
  model, pa, pb, _, _, eval_batches, bn_batches = setup
  return layerwise.layerwise_barriers(model.apply, (pa, pb), TS, {"eval": eval_batches},
                                      bn_batches)


def _flat(tree):
  return dict(zip(groups_lib.leaf_paths(tree), jax.tree.leaves(tree)))


def _reference_params(pa, pb, members, mode, anchor, t):
  """theta_g(t) leaf by leaf, from the module docstring's formula."""
  flat_a, flat_b = _flat(pa), _flat(pb)
  still = flat_a if anchor == "a" else flat_b
  out = {}
  for path in flat_a:
    moves = (path in members) == (mode == "only")
    out[path] = (1 - t) * flat_a[path] + t * flat_b[path] if moves else still[path]
  return jax.tree.unflatten(jax.tree.structure(pa), [out[p] for p in flat_a])


def _reference_curves(model, params_at, x, y, bn_images):
  losses, errors = [], []
  for t in TS:
    params = params_at(float(t))
    stats = batchnorm.recompute_batch_stats(model.apply, {"params": params},
                                            {"image": bn_images})
    logits = model.apply({"params": params, "batch_stats": stats}, x, train=False)
    losses.append(float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()))
    errors.append(float(np.mean(np.argmax(logits, -1) != y)))
  return np.array(losses), np.array(errors)


def test_default_groups_are_top_level_submodules(setup, result):
  _, pa, *_ = setup
  assert result.groups == tuple(pa)
  assert result.metrics["eval"]["loss"].shape == (len(pa), 2, 2, len(TS))


@pytest.mark.parametrize("group_index", [0, -1])
@pytest.mark.parametrize("mode", layerwise.MODES)
@pytest.mark.parametrize("anchor", layerwise.ANCHORS)
def test_matches_python_loop(setup, result, group_index, mode, anchor):
  model, pa, pb, x, y, _, bn_batches = setup
  group = result.groups[group_index]
  members = set(result.members[group])
  loss, error = _reference_curves(
      model, lambda t: _reference_params(pa, pb, members, mode, anchor, t), x, y,
      np.asarray(bn_batches["image"]))
  got = result.path_eval("eval", group, mode, anchor)
  np.testing.assert_allclose(got.loss, loss, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(got.error, error, atol=1e-6)
  chord = (1 - TS) * loss[0] + TS * loss[-1]
  summary = result.summary()["eval"][group][f"{mode}@{anchor}"]
  assert summary["loss"] == pytest.approx(max(0.0, np.max(loss - chord)), abs=2e-5)
  np.testing.assert_allclose(result.excess("eval", "loss", mode, anchor)[group_index],
                             loss - chord, atol=2e-5)


def test_all_groups_moving_is_the_full_path(setup, result):
  model, pa, pb, _, _, eval_batches, bn_batches = setup
  every = {"all": list(pa)}
  lw = layerwise.layerwise_barriers(model.apply, (pa, pb), TS, {"eval": eval_batches},
                                    bn_batches, groups=every, modes=("only",), anchors=("b",))
  full = path_core.path_metrics(model.apply, (pa, pb), TS, {"eval": eval_batches}, bn_batches)
  np.testing.assert_allclose(lw.path_eval("eval", "all", "only", "b").loss, full["eval"].loss,
                             rtol=1e-5)
  # Moving no group: the anchor's own loss at every t (modes 'all_but' of everything).
  still = layerwise.layerwise_barriers(model.apply, (pa, pb), TS, {"eval": eval_batches},
                                       bn_batches, groups=every, modes=("all_but",))
  np.testing.assert_allclose(still.path_eval("eval", "all", "all_but", "a").loss,
                             np.full(len(TS), full["eval"].loss[0]), rtol=1e-5)
  np.testing.assert_allclose(still.path_eval("eval", "all", "all_but", "b").loss,
                             np.full(len(TS), full["eval"].loss[-1]), rtol=1e-5)


def test_groups_from_a_permutation_spec(setup):
  _, pa, *_ = setup
  spec = align.permutation_spec("small_cnn", {"params": pa})
  members = groups_lib.parameter_groups(pa, spec)
  # Each conv is grouped with the BatchNorm that normalises its output; the head is unpermuted.
  assert "unpermuted" in members
  for group, leaves in members.items():
    if group != "unpermuted":
      assert any("Conv" in leaf for leaf in leaves) and any("BatchNorm" in l for l in leaves)
  assert sorted(p for leaves in members.values() for p in leaves) == sorted(
      groups_lib.leaf_paths(pa))


def test_user_groups_and_errors(setup):
  model, pa, pb, _, _, eval_batches, bn_batches = setup
  assert groups_lib.parameter_groups(pa, {"k": ["Conv_0/kernel"]}) == {"k": ("Conv_0/kernel",)}
  with pytest.raises(ValueError, match="matches no parameter.*Conv_0"):
    groups_lib.parameter_groups(pa, ["conv0"])
  with pytest.raises(TypeError, match="groups must be"):
    groups_lib.parameter_groups(pa, "Conv_0")
  call = lambda **kw: layerwise.layerwise_barriers(model.apply, (pa, pb), TS,
                                                   {"eval": eval_batches}, bn_batches, **kw)
  with pytest.raises(ValueError, match="modes must be"):
    call(modes=("alone",))
  with pytest.raises(ValueError, match="anchors must be"):
    call(anchors=())
  with pytest.raises(ValueError, match="repair"):
    call(renormalize="repair")


def test_non_finite_names_the_group(setup):
  model, pa, pb, _, _, eval_batches, bn_batches = setup
  bad = jax.tree.map(lambda x: x, pb)
  bad["head"]["kernel"] = bad["head"]["kernel"] * np.inf
  with pytest.raises(finite.NonFiniteError, match="group .head. only@a"):
    layerwise.layerwise_barriers(model.apply, (pa, bad), TS, {"eval": eval_batches},
                                 bn_batches, groups=["head"], anchors=("a",),
                                 modes=("only",))
