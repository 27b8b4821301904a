"""REPAIR in path evaluation, against a NumPy computation of its definition."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechconn import barriers
from mechconn import models
from mechconn import repair
from mechconn.data.batching import stack_batches


class TinyMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(6)(x))
    x = nn.relu(nn.Dense(5)(x))
    return nn.Dense(3)(x)


def _numpy_repair_loss(pa, pb, t, bn_images, eval_images, labels):
  """REPAIR's definition, layer by layer, in float64."""
  def layers(p):
    return [(np.asarray(p[f"Dense_{i}"]["kernel"], np.float64),
             np.asarray(p[f"Dense_{i}"]["bias"], np.float64)) for i in range(3)]
  la, lb = layers(pa), layers(pb)
  lt = [((1 - t) * wa + t * wb, (1 - t) * ba + t * bb) for (wa, ba), (wb, bb) in zip(la, lb)]

  def sites(ls, x, correct=None):
    """Per-batch (mean, var) of the two hidden Dense outputs; corrected by `correct`."""
    out = []
    h = x.reshape(x.shape[0], -1)
    for i, (w, b) in enumerate(ls[:2]):
      z = h @ w + b
      mean, var = z.mean(0), z.var(0)
      out.append((mean, var))
      if correct == "batch":
        z = (z - mean) / np.sqrt(var + repair.EPSILON) * target[i][1] + target[i][0]
      elif correct is not None:
        m, v = correct[i]
        z = (z - m) / np.sqrt(v + repair.EPSILON) * target[i][1] + target[i][0]
      h = np.maximum(z, 0)
    w, b = ls[2]
    return out, h @ w + b

  def averaged(ls, correct=None):
    per_batch = [sites(ls, x, correct)[0] for x in bn_images]
    return [(np.mean([pb[i][0] for pb in per_batch], 0), np.mean([pb[i][1] for pb in per_batch], 0))
            for i in range(2)]

  ends = [averaged(la), averaged(lb)]
  target = [((1 - t) * ends[0][i][0] + t * ends[1][i][0],
             (1 - t) * np.sqrt(ends[0][i][1]) + t * np.sqrt(ends[1][i][1])) for i in range(2)]
  own = averaged(lt, correct="batch")
  _, logits = sites(lt, eval_images, correct=own)
  logits = logits - logits.max(1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  return -logp[np.arange(len(labels)), labels].mean()


@pytest.fixture(scope="module")
def pair():
  model = TinyMLP()
  rng = np.random.default_rng(0)
  images = rng.normal(size=(96, 2, 2, 3)).astype(np.float32)
  labels = rng.integers(0, 3, 96)
  x = jnp.asarray(images[:2])
  pa = model.init(jax.random.key(0), x)["params"]
  pb = model.init(jax.random.key(1), x)["params"]
  bn = stack_batches(images[:64], labels[:64], 16, drop_remainder=True)
  ev = stack_batches(images[64:], labels[64:], 16)
  return model, pa, pb, images, labels, bn, ev


def test_repair_matches_its_definition_at_every_t(pair):
  model, pa, pb, images, labels, bn, ev = pair
  ts = np.linspace(0, 1, 5)
  result = barriers.evaluate_path(model.apply, (pa, pb), ts, ev, bn_batches=bn,
                                  renormalize="repair")
  expected = [_numpy_repair_loss(pa, pb, t, images[:64].reshape(4, 16, 2, 2, 3), images[64:],
                                 labels[64:]) for t in ts]
  np.testing.assert_allclose(result.loss, expected, rtol=2e-5, atol=2e-5)
  plain = barriers.evaluate_path(model.apply, (pa, pb), ts, ev, renormalize=None)
  repaired, unrepaired = np.asarray(result.loss), np.asarray(plain.loss)
  assert not np.allclose(unrepaired[1:-1], repaired[1:-1], atol=1e-3)  # it did something
  # At the end points REPAIR rescales each site to its own statistics, so the models nearly
  # stay: a later site's statistics are taken with the earlier ones normalised per batch (as
  # in a BatchNorm reset), which differs from the averaged correction by 0.3% here (batches
  # of 16).
  np.testing.assert_allclose(repaired[[0, -1]], unrepaired[[0, -1]], rtol=0.005)


def test_sites_are_every_dense_but_the_logits(pair):
  model, pa, *_ = pair
  assert repair.sites_of(model.apply, {"params": pa}, jnp.zeros((2, 2, 2, 3))) == (
      ("Dense_0",), ("Dense_1",))


@pytest.mark.slow  # compiles a ViT's path twice
def test_repair_runs_in_every_strategy_and_on_a_vit(pair):
  model = models.ViT(num_classes=3, width=8, depth=1, num_heads=2, patch_size=2)
  _, _, _, images, labels, bn, ev = pair
  pa = model.init(jax.random.key(0), jnp.asarray(images[:2]))["params"]
  pb = model.init(jax.random.key(1), jnp.asarray(images[:2]))["params"]
  out = [barriers.evaluate_path(model.apply, (pa, pb), np.linspace(0, 1, 3), ev, bn_batches=bn,
                                renormalize="repair", strategy=s).loss
         for s in ("map", "vmap")]
  np.testing.assert_allclose(out[0], out[1], rtol=1e-5)


def test_renormalize_choices_are_checked(pair):
  model, pa, pb, _, _, bn, ev = pair
  ts = np.linspace(0, 1, 3)
  with pytest.raises(ValueError, match="renormalize='repair' needs bn_batches"):
    barriers.evaluate_path(model.apply, (pa, pb), ts, ev, renormalize="repair")
  with pytest.raises(ValueError, match="Unknown renormalize 'Repair'"):
    barriers.evaluate_path(model.apply, (pa, pb), ts, ev, renormalize="Repair")
  with pytest.raises(ValueError, match="no BatchNorm layer"):
    barriers.evaluate_path(model.apply, (pa, pb), ts, ev, bn_batches=bn,
                           renormalize="batchnorm")
  cnn = models.SmallCNN(num_classes=3, width=2)
  params = cnn.init(jax.random.key(0), jnp.zeros((2, 2, 2, 3)))["params"]
  with pytest.raises(ValueError, match="has BatchNorm layers: renormalize='repair'"):
    barriers.evaluate_path(cnn.apply, (params, params), ts, ev, bn_batches=bn,
                           renormalize="repair")
