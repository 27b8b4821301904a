"""mechconn.checkpoint: exact round trips, clear errors, nothing overwritten."""

import os

import chex
import jax
import jax.numpy as jnp
import pytest

from mechconn import checkpoint
from mechconn import step as step_lib
from mechconn.models import get_model


# A failed orbax read leaves an async coroutine behind ("Event loop is closed"):
# orbax's noise, not ours.
orbax_noise = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(width):
  model = get_model("small_cnn", 10, width=width)
  tx = step_lib.sgd_cosine(0.1, 10)
  return step_lib.create_train_state(model, tx, jax.random.key(width), jnp.zeros((1, 8, 8, 3)))


def _files(directory):
  return sorted((os.path.relpath(os.path.join(d, f), directory),
                 os.path.getsize(os.path.join(d, f)))
                for d, _, fs in os.walk(directory) for f in fs)


def test_round_trip_is_exact_and_keeps_the_newest(tmp_path):
  state = _state(4)
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=2) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, state.replace(step=jnp.asarray(step, jnp.int32)))
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    restored = ckpt.restore(jax.eval_shape(lambda: state))
  assert isinstance(restored, step_lib.TrainState)
  assert int(restored.step) == 3
  chex.assert_trees_all_equal(restored.params, state.params)
  chex.assert_trees_all_equal(restored.opt_state, state.opt_state)
  raw = checkpoint.Checkpointer(str(tmp_path)).read(2)  # no target needed
  assert set(raw) == {"step", "params", "batch_stats", "opt_state"} and int(raw["step"]) == 2
  chex.assert_trees_all_equal(raw["params"], state.params)


def test_incompatible_checkpoint_names_the_leaf_and_is_kept(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, _state(4))
  before = _files(str(tmp_path))
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"/1: leaf 'batch_stats/BatchNorm_0/mean' is float32\[4\] but the "
                             r"target expects float32\[8\]"):
      ckpt.restore(jax.eval_shape(lambda: _state(8)))
    other_tree = {"params": {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}}
    with pytest.raises(checkpoint.CheckpointError, match="leaves only in the target"):
      ckpt.restore(other_tree)
  assert _files(str(tmp_path)) == before


@orbax_noise
def test_corrupt_checkpoint_is_reported_and_left_alone(tmp_path):
  state = _state(4)
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(5, state)
  data_files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "5") for f in fs
                if os.sep + "d" + os.sep in os.path.join(d, f)]
  assert data_files
  for path in data_files:
    with open(path, "wb") as f:
      f.write(b"not a checkpoint")
  before = _files(str(tmp_path))
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(checkpoint.CheckpointError, match=r"Checkpoint .*/5 .*left as is"):
      ckpt.restore(jax.eval_shape(lambda: state))
    # read() (no target) wraps orbax's failure the same way (it was a raw traceback).
    with pytest.raises(checkpoint.CheckpointError, match=r"Checkpoint .*/5 .*left as is"):
      ckpt.read(5)
  assert _files(str(tmp_path)) == before


@orbax_noise
def test_empty_step_directory_is_reported(tmp_path):
  os.makedirs(tmp_path / "7")
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() == 7
    with pytest.raises(checkpoint.CheckpointError, match=r"/7 is unreadable"):
      ckpt.restore(jax.eval_shape(lambda: _state(4)))
    with pytest.raises(checkpoint.CheckpointError, match=r"/7 (is unreadable|has no readable)"):
      ckpt.read(7)
    with pytest.raises(checkpoint.CheckpointError, match="No checkpoint"):
      checkpoint.Checkpointer(str(tmp_path / "empty")).restore({})


def test_interrupted_save_leaves_no_step(tmp_path):
  # A save killed mid-way leaves orbax's temporary directory, never a step.
  os.makedirs(tmp_path / "9.orbax-checkpoint-tmp-123" / "default")
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() is None
