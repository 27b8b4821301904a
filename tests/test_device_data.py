"""mechconn.data.device, data.steps.StepBatches: batches drawn on the devices equal the host's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechconn import mesh as mesh_lib
from mechconn.data import batching
from mechconn.data import device
from mechconn.data import pipeline
from mechconn.data import steps as data_steps


@pytest.fixture(scope="module")
def splits():
  rng = np.random.default_rng(1)
  box100 = pipeline.make_cue_split(rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8),
                                   np.arange(300) % 100, 100, "box", 0.7)
  return {
      "box": pipeline.load_train_split("shapes10", "box", 0.8, num_examples=400),
      "box100": box100,
      "dominoes": pipeline.load_train_split("shapes10", "dominoes", 0.6, num_examples=400,
                                            simple_dataset="glyphs10"),
      "none": pipeline.load_train_split("shapes10", "none", 0.0, num_examples=400),
  }


@pytest.mark.parametrize("name", ["box", "box100", "dominoes", "none"])
def test_device_examples_are_the_host_examples_bitwise(splits, name):
  split = splits[name]
  data = device.put(split)
  idx = np.random.default_rng(0).permutation(len(split))[:96]
  host = split.examples(idx)
  on_device = jax.device_get(device.examples(data, jnp.asarray(idx)))
  np.testing.assert_array_equal(on_device["image"], host["image"])
  np.testing.assert_array_equal(on_device["label"], host["label"])
  assert on_device["image"].dtype == host["image"].dtype == np.float32
  # Several seeds' indices at once (vmapped ensembles): each row as its own batch.
  stacked = jax.device_get(device.examples(data, jnp.asarray(np.stack([idx, idx[::-1]]))))
  np.testing.assert_array_equal(stacked["image"][1], split.examples(idx[::-1])["image"])


def test_pixel_table_is_the_host_normalisation():
  # XLA rewrites x / 255 as x * (1 / 255): a computed normalisation would differ in the last
  # bit for most pixel values; the table holds what numpy's float32 arithmetic gives.
  assert device.PIXEL_VALUES.dtype == np.float32 and device.PIXEL_VALUES.shape == (256,)
  values = np.arange(256, dtype=np.float32)
  np.testing.assert_array_equal(device.PIXEL_VALUES, (values / np.float32(255.0) - 0.5) / 0.5)
  assert device.PIXEL_VALUES[0] == -1.0 and device.PIXEL_VALUES[255] == 1.0
  assert np.all(np.diff(device.PIXEL_VALUES) > 0)


@pytest.mark.parametrize("seeds", [3, [3, 4]])
def test_step_batches_are_the_same_from_either_pipeline(splits, seeds):
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  split = splits["dominoes"]
  host = data_steps.StepBatches(split, 32, mesh, "host")
  dev = data_steps.StepBatches(split, 32, mesh, "device")
  assert dev.on_device and not host.on_device
  for step in (0, 11, 12, 40):  # 12 steps per epoch: the second epoch's order too
    a, b = jax.device_get(host(seeds, step)), jax.device_get(dev(seeds, step))
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  one = jax.device_get(host(3, 11))  # the loop's rule: batch 11 of epoch 0 in seed 3's order
  expected = split.examples(batching.batch_indices_at_step(len(split), 32, seed=3, step=11))
  np.testing.assert_array_equal(one["image"], expected["image"])


def test_auto_puts_a_split_on_the_device_when_it_fits(splits, monkeypatch):
  split = splits["box"]
  assert data_steps.on_device(split, "auto")  # 1.2 MB
  monkeypatch.setattr(data_steps, "device_memory_bytes", lambda: device.nbytes(split))
  assert not data_steps.on_device(split, "auto")  # more than a quarter of the device
  assert data_steps.on_device(split, "device") and not data_steps.on_device(split, "host")
  with pytest.raises(ValueError, match=r"Unknown data pipeline 'gpu'"):
    data_steps.on_device(split, "gpu")


def _loop_states(step_fn, batch_fn, state, steps):
  metrics = []
  for step in range(steps):
    state, m = step_fn(state, batch_fn(step))
    metrics.append(float(m["loss"]))
  return state, metrics


def test_the_seeds_of_one_step_share_one_compiled_drawing_step(splits):
  """A step bound to a seed's root key (a keyword array) is not baked into the program: a
  second seed reuses it, and each seed's run equals its run on the host pipeline."""
  from mechconn import step as step_lib  # pylint: disable=import-outside-toplevel
  from mechconn import timing  # pylint: disable=import-outside-toplevel
  from mechconn.models import SmallCNN  # pylint: disable=import-outside-toplevel
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  model, tx = SmallCNN(width=3), step_lib.sgd_cosine(0.123, 10)  # compiled by no other test
  loss_fn = step_lib.ClassificationLoss(model.apply)
  init = step_lib.create_train_state(model, tx, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  split = splits["box"]
  runs = {}
  for seed in (5, 6):
    for mode in ("device", "host"):
      step = functools.partial(step_lib.train_step, loss_fn=loss_fn, tx=tx,
                               root_key=mesh_lib.replicate(jax.random.key(seed), mesh))
      step_fn, batch_fn = data_steps.loop_inputs_for(step, split, 32, seed, mesh, mode)
      fresh = jax.device_put(jax.tree.map(jnp.copy, init),  # placed as the loop places it
                             mesh_lib.replicated(mesh))
      with timing.recording() as clock:
        state, losses = _loop_states(step_fn, batch_fn, fresh, 3)
      runs[seed, mode] = (state, losses, clock.compiled_functions)
  assert runs[5, "device"][2]["jit(_drawing_step)"][0] == 1
  assert "jit(_drawing_step)" not in runs[6, "device"][2]  # seed 6: compiled by seed 5
  assert runs[5, "device"][1] != runs[6, "device"][1]  # the key and order are seed 6's
  for seed in (5, 6):
    assert runs[seed, "device"][1] == runs[seed, "host"][1]
    for a, b in zip(jax.tree.leaves(runs[seed, "device"][0].params),
                    jax.tree.leaves(runs[seed, "host"][0].params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
