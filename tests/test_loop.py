"""mechconn.loop: the resumable loop and `fit` learn, are deterministic, and stop on NaN."""

import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mechconn import checkpoint
from mechconn import finite
from mechconn import loop
from mechconn import mesh as mesh_lib
from mechconn import step as step_lib
from mechconn import workdir as workdir_lib
from mechconn.data import batching
from mechconn.data.prototypes import make_prototype_images
from mechconn.models import get_model


@pytest.fixture(scope="module")
def data():
  train_xy = make_prototype_images(1, 2048, image_size=16, noise=0.8)
  test_xy = make_prototype_images(2, 256, image_size=16, noise=0.8)
  return train_xy, test_xy


def test_fit_learns_and_is_deterministic(data):
  (x, y), (xt, yt) = data
  model = get_model("small_cnn", 10, width=8)
  tx = optax.sgd(0.05, momentum=0.9)
  runs = [loop.fit(model, tx, x, y, batch_size=64, num_epochs=3, seed=3, progress=False)
          for _ in range(2)]
  (state, history), (state2, _) = runs
  chex.assert_trees_all_equal(state.params, state2.params)
  assert history[-1]["loss"] < history[0]["loss"]
  logits = model.apply(state.variables, jnp.asarray(xt), train=False)
  assert np.mean(np.argmax(logits, -1) == yt) > 0.8  # chance is 0.1
  assert int(state.step) == 3 * (2048 // 64)


def test_non_finite_loss_raises_with_its_step(data):
  (x, y), _ = data
  model = get_model("mlp", 10, hidden=(8,))
  with pytest.raises(finite.NonFiniteError, match=r"diverged at step \d+"):
    loop.fit(model, optax.sgd(1e30), x, y, batch_size=64, num_epochs=2, seed=0,
              progress=False)


def test_fit_with_one_nan_image_is_refused_before_training(data):
  (x, y), _ = data
  x = x.copy()
  x[700, 2, 2, 1] = np.nan  # was: fit "succeeded" with NaN parameters
  model = get_model("small_cnn", 10, width=4)
  with pytest.raises(finite.NonFiniteError, match=r"fit: 1 of the 2048 training images hold "
                                                  r"NaN or infinity \(first: index 700\)"):
    loop.fit(model, optax.sgd(0.01), x, y, batch_size=64, num_epochs=1, seed=0,
              progress=False)


def _tiny_loop(workdir, num_steps, poison=None, run_config=None, **option_kwargs):
  """train_loop on a 1-device mesh for an MLP on prototype images."""
  (x, y) = make_prototype_images(1, 256, image_size=8, noise=0.8)
  model = get_model("mlp", 10, hidden=(16,))
  tx = step_lib.sgd_cosine(0.05, 32)
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  init_fn = functools.partial(step_lib.create_train_state, model, tx, jax.random.key(0),
                              jnp.zeros((1, 8, 8, 3)))
  step_fn = functools.partial(step_lib.train_step, root_key=jax.random.key(1),
                              loss_fn=step_lib.ClassificationLoss(model.apply), tx=tx)

  def batch_fn(step):
    idx = batching.batch_indices_at_step(256, 32, seed=0, step=step)
    return mesh_lib.shard_batch({"image": x[idx], "label": y[idx]}, mesh)

  options = loop.LoopOptions(num_steps=num_steps, log_every=3, checkpoint_every=5,
                              progress=False, **option_kwargs)
  return loop.train_loop(init_fn, (poison or (lambda f: f))(step_fn), batch_fn, str(workdir),
                         options, mesh=mesh, eval_fn=lambda s: {"eval/step_seen": int(s.step)},
                         run_config=run_config)


def _saved_steps(workdir):
  with checkpoint.Checkpointer(str(workdir / loop.CHECKPOINT_DIR)) as ckpt:
    steps = ckpt.all_steps()
    assert all(bool(finite.all_finite_jit(ckpt.read(s))) for s in steps)
  return steps


def test_a_nan_in_a_batch_stops_the_loop_at_its_step_and_nothing_after_is_saved(tmp_path):
  def nan_at_step_6(step_fn):  # the update from step 6 to 7 sees a NaN image
    def step(state, batch):
      if int(state.step) == 6:
        batch = {**batch, "image": batch["image"].at[0, 0, 0, 0].set(jnp.nan)}
      return step_fn(state, batch)
    return step

  with pytest.raises(finite.NonFiniteError,
                     match=r"diverged at step 7 \(the update from step 6 to 7.*"
                           r"last good checkpoint is .*checkpoints/5\b"):
    _tiny_loop(tmp_path, 32, poison=nan_at_step_6)
  assert _saved_steps(tmp_path) == [5]  # the next save (step 10) would have held NaN


def test_a_nan_the_metrics_do_not_see_is_caught_before_the_checkpoint(tmp_path):
  def nan_params_at_step_10(step_fn):  # finite metrics, a NaN parameter
    def step(state, batch):
      state, metrics = step_fn(state, batch)
      if int(state.step) == 10:
        params = jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan), state.params)
        state = state.replace(params=params)
      return state, metrics
    return step

  with pytest.raises(finite.NonFiniteError,
                     match=r"state after step 10 holds NaN or infinity \(first at params/.*\)"
                           r".*before saving it.*checkpoints/5\b"):
    _tiny_loop(tmp_path, 32, poison=nan_params_at_step_10)
  assert _saved_steps(tmp_path) == [5]


def test_train_loop_continues_where_a_shorter_run_stopped(tmp_path):
  full = _tiny_loop(tmp_path / "full", 32, eval_every=10)
  _tiny_loop(tmp_path / "parts", 12, eval_every=10)  # checkpoints 5, 10 and 12
  resumed = _tiny_loop(tmp_path / "parts", 32, eval_every=10)
  chex.assert_trees_all_equal(resumed, full)
  records = workdir_lib.read_metrics(str(tmp_path / "parts" / workdir_lib.METRICS_FILE))
  expected = workdir_lib.read_metrics(str(tmp_path / "full" / workdir_lib.METRICS_FILE))
  # Past the shorter run's end (whose own last step logged an extra line) the logs agree.
  assert [r for r in records if r["step"] > 12] == [r for r in expected if r["step"] > 12]
  evals = [(r["step"], r["eval/step_seen"]) for r in records if "eval/step_seen" in r]
  assert evals == [(10, 10), (12, 12), (20, 20), (30, 30), (32, 32)]
  # TensorBoard shows the same scalars: one event file per launch (test_metric_writers).
  from test_metric_writers import event_files, jsonl_scalars, tensorboard_view  # pylint: disable=g-import-not-at-top
  assert len(event_files(tmp_path / "parts")) == 2
  assert tensorboard_view(tmp_path / "parts") == jsonl_scalars(tmp_path / "parts")


def test_epoch_permutation_depends_only_on_seed_and_epoch():
  a = batching.epoch_permutation(0, 1, 100)
  np.testing.assert_array_equal(a, batching.epoch_permutation(0, 1, 100))
  assert not np.array_equal(a, batching.epoch_permutation(0, 2, 100))
  assert sorted(a) == list(range(100))




def test_epoch_batches_are_the_epoch_permutation_in_full_batches():
  batches = batching.epoch_batches(100, 32, seed=4, epoch=2)
  order = batching.epoch_permutation(4, 2, 100)
  assert batches.shape == (3, 32)  # the last 4 examples make no full batch
  np.testing.assert_array_equal(batches.reshape(-1), order[:96])
  for step in range(9):  # step s is batch s % 3 of epoch s // 3
    np.testing.assert_array_equal(
        batching.batch_indices_at_step(100, 32, seed=4, step=step),
        batching.epoch_batches(100, 32, seed=4, epoch=step // 3)[step % 3])
  with pytest.raises(ValueError, match="make no batch"):
    batching.epoch_batches(10, 32, seed=0, epoch=0)


def test_a_checkpoint_of_another_config_is_never_resumed(tmp_path):
  """Each checkpoint records its run's config; a resume from one of another config (copied
  in, or left by another run) is refused, naming the keys, and the checkpoint is kept."""
  config = {"task": "train", "optimizer": {"learning_rate": 0.05}}
  _tiny_loop(tmp_path, 5, run_config=config)
  with checkpoint.Checkpointer(str(tmp_path / loop.CHECKPOINT_DIR)) as ckpt:
    assert ckpt.recorded_config(5) == config
  other = {"task": "train", "optimizer": {"learning_rate": 0.5}}
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"checkpoints/5 was written by a run of another config \(differs in "
                           r"\['optimizer.learning_rate'\]\).*left as is"):
    _tiny_loop(tmp_path, 10, run_config=other)
  assert _saved_steps(tmp_path) == [5]
  resumed = _tiny_loop(tmp_path, 10, run_config=config)  # its own config: resumes
  assert int(resumed.step) == 10


def test_a_nan_checkpoint_is_named_as_such_on_resume(tmp_path):
  """A checkpoint holding NaN (mechconn never saves one: written by something else) is not
  "the last good checkpoint": the resume refuses it, naming the leaf."""
  _tiny_loop(tmp_path, 5)
  with checkpoint.Checkpointer(str(tmp_path / "bad")) as ckpt, checkpoint.Checkpointer(
      str(tmp_path / loop.CHECKPOINT_DIR)) as source:
    stored = source.read(5)
    stored["params"] = jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan),
                                    stored["params"])
    ckpt.save(7, stored)
  os.rename(tmp_path / "bad" / "7", tmp_path / loop.CHECKPOINT_DIR / "7")
  with pytest.raises(finite.NonFiniteError, match=r"Checkpoint .*checkpoints/7 holds NaN or "
                                                  r"infinity \(first at params/.*not a state "
                                                  r"to resume from.*move it away"):
    _tiny_loop(tmp_path, 10)
