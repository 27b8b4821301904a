"""Permutation specs keep the function; matching recovers a hidden permutation exactly."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechconn import align
from mechconn import matching
from mechconn import barriers
from mechconn import batchnorm
from mechconn import finite
from mechconn import input_checks
from mechconn.data import batching
from mechconn.models import get_model

ARCHS = {
    "mlp": dict(hidden=(8, 6)),
    "small_cnn": dict(width=4),
    "vgg13": dict(width=1 / 32),
    "resnet18": dict(width=1 / 16),
}


def _init(name, seed):
  model = get_model(name, 10, **ARCHS[name])
  x = jax.random.normal(jax.random.key(100), (8, 16, 16, 3))
  variables = model.init(jax.random.key(seed), x)
  if "batch_stats" in variables:  # non-trivial running statistics
    variables = {"params": variables["params"],
                 "batch_stats": jax.tree.map(
                     lambda s: s + jax.random.uniform(jax.random.key(seed + 1), s.shape),
                     variables["batch_stats"])}
  return model, variables, x


# VGG13's and ResNet18's inits and matchings cost ~7 and ~10 s here: in the full suite, not
# the fast loop (which keeps the MLP and the CNN).
ARCH_PARAMS = [pytest.param(name, marks=pytest.mark.slow) if name in ("vgg13", "resnet18")
               else name for name in sorted(ARCHS)]


@pytest.fixture(scope="module", params=ARCH_PARAMS)
def arch(request):
  model, variables, x = _init(request.param, 0)
  spec = align.permutation_spec(request.param, variables["params"])
  perm = align.random_permutation(spec, variables["params"], seed=3)
  return request.param, model, variables, x, spec, perm


def test_permutation_keeps_the_function(arch):
  name, model, variables, x, spec, perm = arch
  permuted = align.apply_permutation(spec, perm, variables)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(permuted["params"]), jax.tree.leaves(variables["params"])))
  np.testing.assert_allclose(model.apply(permuted, x), model.apply(variables, x),
                             rtol=1e-4, atol=1e-5)
  if "batch_stats" in variables:  # training mode: batch statistics permute along
    out_p, _ = model.apply(permuted, x, train=True, mutable=["batch_stats"])
    out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out_p, out, rtol=1e-4, atol=1e-5)


def test_weight_matching_recovers_a_hidden_permutation(arch):
  name, model, variables, x, spec, perm = arch
  other = align.apply_permutation(spec, perm, variables)
  found = matching.weight_matching(spec, variables["params"], other["params"])
  aligned = align.apply_permutation(spec, found, other)
  chex.assert_trees_all_equal(aligned, variables)


def test_activation_matching_recovers_a_hidden_permutation(arch):
  name, model, variables, x, spec, perm = arch
  batches = [jax.random.normal(jax.random.key(i), (16, 16, 16, 3)) for i in range(2)]
  if "batch_stats" in variables:  # running statistics of the data, as in a trained model
    variables = {"params": variables["params"], "batch_stats": batchnorm.recompute_batch_stats(
        model.apply, variables, {"image": jnp.stack(batches)})}
  other = align.apply_permutation(spec, perm, variables)
  found = matching.activation_matching(model.apply, spec, variables, other, batches)
  chex.assert_trees_all_equal(align.apply_permutation(spec, found, other), variables)


def test_activation_statistics_are_exact_correlations():
  model, variables, x = _init("mlp", 0)
  spec = align.permutation_spec("mlp", variables["params"])
  other = _init("mlp", 5)[1]
  batches = [jax.random.normal(jax.random.key(i), (8, 16, 16, 3)) for i in range(3)]
  corr = matching.activation_statistics(model.apply, spec, variables, other, batches)
  images = np.concatenate([np.asarray(b) for b in batches]).reshape(24, -1)
  a = images @ np.asarray(variables["params"]["Dense_0"]["kernel"]) + np.asarray(
      variables["params"]["Dense_0"]["bias"])
  b = images @ np.asarray(other["params"]["Dense_0"]["kernel"]) + np.asarray(
      other["params"]["Dense_0"]["bias"])
  expected = np.corrcoef(a.T, b.T)[:8, 8:]
  np.testing.assert_allclose(corr["P_0"], expected, rtol=1e-4, atol=1e-5)


def test_post_relu_statistics_tell_apart_units_that_differ_only_in_bias():
  """Units relu(x0 - b) with different knots b: their pre-activations correlate perfectly
  with each other, their outputs do not. With post=jax.nn.relu the correlations are the
  outputs' (np.corrcoef) and matching recovers a hidden permutation of the units."""
  model = get_model("mlp", 2, hidden=(4,))
  x = np.random.default_rng(0).uniform(-1, 1, size=(512, 3)).astype(np.float32)
  params = model.init(jax.random.key(0), jnp.asarray(x[:1]))["params"]
  kernel = np.zeros((3, 4), np.float32)
  kernel[0] = 1.0
  params = {"Dense_0": {"kernel": jnp.asarray(kernel),
                        "bias": jnp.asarray([0.6, 0.2, -0.2, -0.6], jnp.float32)},
            "head": params["head"]}
  spec = align.permutation_spec("mlp", params)
  hidden = np.array([2, 0, 3, 1])
  other = align.apply_permutation(spec, {"P_0": hidden}, params)
  a, b = ({"params": p} for p in (params, other))
  pre = matching.activation_statistics(model.apply, spec, a, b, [jnp.asarray(x)])["P_0"]
  assert np.allclose(pre, 1.0, atol=1e-5)  # every pair: the same linear function of x0
  post = matching.activation_statistics(model.apply, spec, a, b, [jnp.asarray(x)],
                                        post=jax.nn.relu)["P_0"]
  relu = lambda p: np.maximum(x @ np.asarray(p["Dense_0"]["kernel"])
                              + np.asarray(p["Dense_0"]["bias"]), 0)
  np.testing.assert_allclose(post, np.corrcoef(relu(params).T, relu(other).T)[:4, 4:],
                             rtol=1e-4, atol=1e-5)
  found = matching.activation_matching(model.apply, spec, a, b, [jnp.asarray(x)],
                                       post=jax.nn.relu)
  restored = align.apply_permutation(spec, found, other)
  np.testing.assert_array_equal(restored["Dense_0"]["bias"], params["Dense_0"]["bias"])


def test_aligned_permuted_copy_has_zero_barrier():
  model, variables, _ = _init("small_cnn", 0)
  spec = align.permutation_spec("small_cnn", variables["params"])
  perm = align.random_permutation(spec, variables, 1)
  other = align.apply_permutation(spec, perm, variables)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(64, 16, 16, 3)).astype(np.float32)
  labels = rng.integers(0, 10, 64)
  eval_batches = batching.stack_batches(images, labels, 32)
  bn = {"image": images.reshape(2, 32, 16, 16, 3)}
  ts = np.linspace(0, 1, 5)
  raw = barriers.evaluate_path(model.apply, (variables["params"], other["params"]), ts,
                               eval_batches, bn_batches=bn)
  assert raw.summary()["loss"] > 1e-3  # unaligned: the middle differs from the ends
  found = matching.weight_matching(spec, variables["params"], other["params"])
  aligned = align.apply_permutation(spec, found, other["params"])
  # The permutation is found exactly: the aligned copy is the reference, weight for weight.
  with pytest.warns(input_checks.IdenticalEndpointsWarning):
    result = barriers.evaluate_path(model.apply, (variables["params"], aligned), ts,
                                    eval_batches, bn_batches=bn)
  np.testing.assert_allclose(result.loss, result.loss[0], rtol=1e-5)
  assert result.summary()["loss"] == pytest.approx(0.0, abs=1e-5)


def test_spec_errors_name_the_leaves():
  _, variables, _ = _init("small_cnn", 0)
  spec = align.permutation_spec("vgg13", variables["params"])  # sized from params: 3 convs
  assert "params/Conv_2/kernel" in spec.axes and "params/Conv_3/kernel" not in spec.axes
  bad = align.conv_chain_spec(4)
  with pytest.raises(ValueError, match=r"spec entries without a leaf \['batch_stats/BatchNorm_3"):
    align.apply_permutation(bad, align.identity_permutation(spec, variables), variables)
  with pytest.raises(ValueError, match="No permutation spec for model 'vit'"):
    align.permutation_spec("vit", variables["params"])


def test_matching_models_of_other_widths_or_another_spec_is_a_named_error():
  _, narrow, _ = _init("small_cnn", 0)
  model = get_model("small_cnn", 10, width=8)
  wide = model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 3)))
  spec = align.permutation_spec("small_cnn", narrow["params"])
  with pytest.raises(ValueError, match=r"one architecture and width.*'BatchNorm_0'\]\['bias'\].*\(4,\).*\(8,\)"):
    matching.weight_matching(spec, narrow["params"], wide["params"])
  with pytest.raises(ValueError, match=r"one architecture and width"):
    matching.activation_matching(model.apply, spec, narrow, wide, [jnp.zeros((4, 8, 8, 3))])
  with pytest.raises(ValueError, match=r"does not fit the reference model.*another architecture"):
    matching.weight_matching(align.resnet18_spec(), narrow["params"], narrow["params"])
  diverged = jax.tree.map(lambda p: p * jnp.nan, narrow["params"])
  with pytest.raises(finite.NonFiniteError, match=r"other model's parameters hold NaN .*first at"):
    matching.weight_matching(spec, narrow["params"], diverged)


def test_a_permutation_of_the_wrong_size_or_with_repeats_is_refused():
  _, variables, _ = _init("small_cnn", 0)
  spec = align.permutation_spec("small_cnn", variables["params"])
  perm = align.identity_permutation(spec, variables["params"])
  short = {**perm, "P_0": perm["P_0"][:-1]}  # was: a BatchNorm with 3 units of 4, silently
  with pytest.raises(ValueError, match=r"perm\['P_0'\] must be a permutation of range\(4\)"):
    align.apply_permutation(spec, short, variables["params"])
  with pytest.raises(ValueError, match=r"perm\['P_1'\] must be a permutation"):
    align.apply_permutation(spec, {**perm, "P_1": np.zeros(4, int)}, variables["params"])


def test_apply_permutation_returns_the_kind_it_was_given():
  _, variables, _ = _init("small_cnn", 0)
  spec = align.permutation_spec("small_cnn", variables)
  perm = align.random_permutation(spec, variables, seed=2)
  permuted = align.apply_permutation(spec, perm, variables)
  assert jax.tree.structure(permuted) == jax.tree.structure(variables)
  np.testing.assert_array_equal(permuted["batch_stats"]["BatchNorm_0"]["mean"],
                                variables["batch_stats"]["BatchNorm_0"]["mean"][perm["P_0"]])
  params = align.apply_permutation(spec, perm, variables["params"])
  assert jax.tree.structure(params) == jax.tree.structure(variables["params"])
  chex.assert_trees_all_equal(params, permuted["params"])


def test_the_deprecated_batch_stats_argument_warns_and_returns_the_old_tuple():
  _, variables, _ = _init("small_cnn", 0)
  spec = align.permutation_spec("small_cnn", variables["params"])
  perm = align.random_permutation(spec, variables, seed=2)
  with pytest.warns(DeprecationWarning, match=r"apply_permutation\(spec, perm, variables\)"):
    params, stats = align.apply_permutation(spec, perm, variables["params"],
                                            variables["batch_stats"])
  chex.assert_trees_all_equal({"params": params, "batch_stats": stats},
                              align.apply_permutation(spec, perm, variables))


def test_weight_matching_reads_the_params_of_variables():
  _, variables, _ = _init("small_cnn", 0)
  spec = align.permutation_spec("small_cnn", variables["params"])
  other = align.apply_permutation(spec, align.random_permutation(spec, variables, 4), variables)
  from_variables = matching.weight_matching(spec, variables, other)
  from_params = matching.weight_matching(spec, variables["params"], other["params"])
  chex.assert_trees_all_equal(from_variables, from_params)
  assert any(not np.array_equal(p, np.arange(len(p))) for p in from_params.values())
  align.check_pair(spec, variables, other)
  chex.assert_trees_all_equal(align.group_sizes(spec, variables),
                              align.group_sizes(spec, variables["params"]))


def test_arguments_of_the_wrong_kind_are_named_errors():
  model, variables, _ = _init("small_cnn", 0)
  spec = align.permutation_spec("small_cnn", variables["params"])
  params = variables["params"]
  with pytest.raises(TypeError, match=r"`weight_matching\(spec, reference, other\)`: the first "
                     r"argument must be a PermutationSpec \(got a dict of parameters; "
                     r"arguments swapped\?\)"):
    matching.weight_matching(params, params, spec)
  with pytest.raises(TypeError, match=r"`reference` must be params .*\(got a PermutationSpec; "
                     r"arguments swapped\?\)"):
    matching.weight_matching(spec, spec, params)
  with pytest.raises(TypeError, match=r"`apply_permutation\(spec, perm, tree\)`: the first "
                     r"argument must be a PermutationSpec \(got a dict of variables"):
    align.apply_permutation(variables, align.identity_permutation(spec, params), spec)
  with pytest.raises(TypeError, match=r"`check_pair\(spec, reference, other\)`: `other` must "
                     r"be params .*\(got a PermutationSpec"):
    align.check_pair(spec, params, spec)
  with pytest.raises(TypeError, match=r"`random_permutation\(spec, params, seed\)`: .*got a "
                     r"dict of parameters; arguments swapped"):
    align.random_permutation(params, spec, 0)
  batches = [jnp.zeros((2, 16, 16, 3))]
  with pytest.raises(TypeError, match=r"`activation_matching\(apply_fn, spec, .*the second "
                     r"argument must be a PermutationSpec \(got a dict of variables"):
    matching.activation_matching(model.apply, variables, spec, variables, batches)
  with pytest.raises(ValueError, match=r"`variables_other` runs the network: pass the full "
                     r"variables \{'params', 'batch_stats'\}"):
    matching.activation_matching(model.apply, spec, variables, params, batches)


def test_aligning_with_a_spec_without_groups_is_refused():
  model, variables, x = _init("small_cnn", 0)
  spec = align.permutation_spec("small_cnn", variables)
  empty = align.PermutationSpec({path: (None,) * len(perms) for path, perms in spec.axes.items()},
                                {})
  other = align.apply_permutation(spec, align.random_permutation(spec, variables, 1), variables)
  nothing = r"the permutation spec has no permutation group .* nothing to permute"
  with pytest.raises(ValueError, match=r"`weight_matching\(spec, reference, other\)`: " + nothing):
    matching.weight_matching(empty, variables, other)
  with pytest.raises(ValueError, match=r"`activation_matching\(apply_fn, spec, .*" + nothing):
    matching.activation_matching(model.apply, empty, variables, other, [x])
  with pytest.raises(ValueError, match=r"`activation_statistics\(apply_fn, spec, .*" + nothing):
    matching.activation_statistics(model.apply, empty, variables, other, [x])
