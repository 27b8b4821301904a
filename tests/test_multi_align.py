"""N-model alignment: planted permutations recovered by both methods and both matchings,
cycle-consistency, synchronisation against its definition, the correlations against
the pairwise ones, MergeMany's fixed point; NNX through the adapter; named errors."""

import itertools

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechconn import adapters
from mechconn import align
from mechconn import batchnorm
from mechconn import matching
from mechconn import multi_align
from mechconn import symmetry
from mechconn.models import get_model

ARCHS = {"small_cnn": dict(width=4), "mlp": dict(hidden=(8, 6))}


def _batches():
  return [jax.random.normal(jax.random.key(i), (16, 16, 16, 3)) for i in range(2)]


def _trained_like(name, seed):
  """A model whose BatchNorm statistics are those of the data (as a trained model's)."""
  model = get_model(name, 10, **ARCHS[name])
  variables = model.init(jax.random.key(seed), jnp.zeros((2, 16, 16, 3)))
  if "batch_stats" in variables:
    variables = {"params": variables["params"], "batch_stats": batchnorm.recompute_batch_stats(
        model.apply, variables, {"image": jnp.stack(_batches())})}
  return model, variables


@pytest.fixture(scope="module", params=sorted(ARCHS))
def planted(request):
  """N = 4 copies of one model, three of them permuted by random permutations."""
  model, variables = _trained_like(request.param, 0)
  spec = align.permutation_spec(request.param, variables["params"])
  copies = [variables] + [align.apply_permutation(
      spec, align.random_permutation(spec, variables, seed=s), variables) for s in (1, 2, 3)]
  return model, spec, copies


@pytest.mark.parametrize("method", multi_align.METHODS)
@pytest.mark.parametrize("kind", multi_align.MATCHINGS)
def test_planted_permutations_are_recovered_exactly(planted, method, kind):
  model, spec, copies = planted
  result = multi_align.align_models(spec, copies, method=method, matching=kind,
                                    apply_fn=model.apply, batches=_batches())
  for aligned in result.aligned(spec, copies):
    chex.assert_trees_all_equal(aligned, copies[0])
  assert multi_align.cycle_error(result.pairwise(), len(copies)) == 0.0
  assert result.method == method and result.matching == kind and result.seconds > 0


def _distinct_mlps(n):
  model = get_model("mlp", 10, hidden=(12, 10))
  models = [model.init(jax.random.key(s), jnp.zeros((2, 16, 16, 3))) for s in range(n)]
  return model, align.permutation_spec("mlp", models[0]["params"]), models


def test_independent_pairwise_maps_are_not_cycle_consistent_and_both_methods_are():
  model, spec, models = _distinct_mlps(4)
  pairwise = multi_align.pairwise_permutations(spec, models)
  assert multi_align.cycle_error(pairwise, 4) > 0.2  # unrelated random nets: mostly inconsistent
  for method in multi_align.METHODS:
    result = multi_align.align_models(spec, models, method=method)
    assert multi_align.cycle_error(result.pairwise(), 4) == 0.0
    np.testing.assert_array_equal(result.perms[0]["P_0"], np.arange(12))


def _cycle_error_by_loops(pairwise, n):
  """The definition, unit by unit."""
  wrong = total = 0
  for i, j, k in itertools.combinations(range(n), 3):
    for g in pairwise[(i, k)]:
      for u in range(len(pairwise[(i, k)][g])):
        total += 1
        wrong += pairwise[(j, k)][g][pairwise[(i, j)][g][u]] != pairwise[(i, k)][g][u]
  return wrong / total


def test_cycle_error_is_its_definition():
  _, spec, models = _distinct_mlps(4)
  pairwise = multi_align.pairwise_permutations(spec, models)
  assert multi_align.cycle_error(pairwise, 4) == pytest.approx(_cycle_error_by_loops(pairwise, 4))


def _maps_between(perms):
  """{(i, j): j into i} by the definition: unit u of i sits where j's unit sits."""
  out = {}
  for i, j in itertools.combinations(range(len(perms)), 2):
    out[(i, j)] = {g: np.array([perms[j][g][list(perms[i][g]).index(u)]
                                for u in range(len(perms[i][g]))]) for g in perms[i]}
  return out


def test_synchronisation_keeps_consistent_maps_and_repairs_a_corrupted_one():
  rng = np.random.default_rng(0)
  n, units = 5, 7
  truth = [{"P_0": np.arange(units)}] + [{"P_0": rng.permutation(units)} for _ in range(n - 1)]
  consistent = _maps_between(truth)
  perms = multi_align.synchronize(consistent, n)
  for i in range(n):
    np.testing.assert_array_equal(perms[i]["P_0"], truth[i]["P_0"])
  corrupted = dict(consistent)
  wrong = consistent[(1, 3)]["P_0"].copy()
  wrong[[0, 1]] = wrong[[1, 0]]
  corrupted[(1, 3)] = {"P_0": wrong}
  assert multi_align.cycle_error(corrupted, n) > 0
  perms = multi_align.synchronize(corrupted, n)
  for i in range(n):  # the other nine maps outvote the corrupted one
    np.testing.assert_array_equal(perms[i]["P_0"], truth[i]["P_0"])


def test_joint_correlations_equal_the_pairwise_statistics():
  model, v0 = _trained_like("small_cnn", 0)
  models = [v0, _trained_like("small_cnn", 1)[1], _trained_like("small_cnn", 2)[1]]
  spec = align.permutation_spec("small_cnn", v0["params"])
  joint = multi_align.joint_correlations(model.apply, spec, models, _batches(), jax.nn.relu)
  for i, j in itertools.combinations(range(3), 2):
    pair = matching.activation_statistics(model.apply, spec, models[i], models[j], _batches(),
                                          jax.nn.relu)
    for g in pair:
      np.testing.assert_allclose(joint[g][i, j], pair[g], atol=2e-5)
      np.testing.assert_allclose(joint[g][j, i], pair[g].T, atol=2e-5)


def test_merge_many_stops_at_a_fixed_point_of_its_definition():
  _, spec, models = _distinct_mlps(4)
  result = multi_align.align_models(spec, models, method="merge_many", seed=0)
  aligned = [m["params"] for m in result.aligned(spec, models)]
  for i in range(4):  # each model already matches the mean of the others: weight matching
    mean = jax.tree.map(lambda *xs: sum(np.asarray(x, np.float64) for x in xs) / 3,
                        *[aligned[j] for j in range(4) if j != i])
    again = matching.weight_matching(spec, mean, aligned[i])
    for g, p in again.items():
      np.testing.assert_array_equal(p, np.arange(len(p)))
  assert 1 <= result.sweeps < 100


class _NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 6, rngs=rngs)
    self.norm = nnx.LayerNorm(6, rngs=rngs)
    self.out = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.norm(self.hidden(x))))


def test_nnx_models_through_the_adapter_and_a_derived_spec():
  apply_fn, variables = adapters.from_nnx(_NNXNet(nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(0), (8, 4))
  spec = symmetry.derive_spec(apply_fn, variables, x)
  copies = [variables] + [align.apply_permutation(
      spec, align.random_permutation(spec, variables, seed=s), variables) for s in (1, 2, 3)]
  for method, kind in itertools.product(multi_align.METHODS, multi_align.MATCHINGS):
    result = multi_align.align_models(spec, copies, method=method, matching=kind,
                                      apply_fn=apply_fn, batches=[x])
    for aligned in result.aligned(spec, copies):
      chex.assert_trees_all_equal(aligned, copies[0])


def test_bad_arguments_are_named_errors(planted):
  model, spec, copies = planted
  with pytest.raises(ValueError, match="unknown method 'soup'"):
    multi_align.align_models(spec, copies, method="soup")
  with pytest.raises(ValueError, match="unknown matching"):
    multi_align.align_models(spec, copies, matching="features")
  with pytest.raises(ValueError, match="at least 2 models"):
    multi_align.align_models(spec, copies[:1])
  with pytest.raises(ValueError, match="pass apply_fn and batches"):
    multi_align.align_models(spec, copies, matching="activation")
  with pytest.raises(TypeError, match="PermutationSpec"):
    multi_align.align_models(copies, spec)


def test_models_of_another_width_are_refused():
  _, spec, models = _distinct_mlps(2)
  wider = get_model("mlp", 10, hidden=(14, 10)).init(jax.random.key(5), jnp.zeros((2, 16, 16, 3)))
  with pytest.raises(ValueError, match="model 2 cannot be aligned with model 0"):
    multi_align.align_models(spec, [*models, wider])


def test_missing_pairs_are_named_errors():
  rng = np.random.default_rng(1)
  pairwise = {(0, 1): {"P_0": rng.permutation(4)}, (0, 2): {"P_0": rng.permutation(4)}}
  with pytest.raises(ValueError, match=r"missing \[\(1, 2\)\]"):
    multi_align.synchronize(pairwise, 3)
  with pytest.raises(ValueError, match="every pair"):
    multi_align.cycle_error({**pairwise, (1, 2): {"P_0": np.arange(4)}}, 4)


def test_joint_correlations_refuse_bare_params():
  model, spec, models = _distinct_mlps(2)
  with pytest.raises(ValueError, match="full variables"):
    multi_align.joint_correlations(model.apply, spec, [m["params"] for m in models], _batches())


def test_activation_merge_many_stops_with_dead_units():
  """Units that never fire tie in every correlation: reassigning them must not count as
  progress (each accepted change strictly raises the summed similarity, so it stops)."""
  model, spec, models = _distinct_mlps(4)
  dead = []
  for m in models:
    params = jax.tree.map(lambda x: x, m["params"])
    params["Dense_0"]["kernel"] = params["Dense_0"]["kernel"].at[:, :4].set(0.0)
    params["Dense_0"]["bias"] = params["Dense_0"]["bias"].at[:4].set(-1.0)
    dead.append({"params": params})
  result = multi_align.align_models(spec, dead, method="merge_many", matching="activation",
                                    apply_fn=model.apply, batches=_batches(), post=jax.nn.relu,
                                    max_sweeps=20)
  assert result.sweeps < 20
  assert multi_align.cycle_error(result.pairwise(), 4) == 0.0
