"""The training step and loop learn the embedded task and are deterministic."""

import functools
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mechconn import checkpoint
from mechconn import finite
from mechconn import mesh as mesh_lib
from mechconn import train
from mechconn import workdir as workdir_lib
from mechconn.data.prototypes import make_prototype_images
from mechconn.models import get_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from experiments.configs import train as train_configs  # noqa: E402


@pytest.fixture(scope="module")
def data():
  train_xy = make_prototype_images(1, 2048, image_size=16, noise=0.8)
  test_xy = make_prototype_images(2, 256, image_size=16, noise=0.8)
  return train_xy, test_xy


def test_fit_learns_and_is_deterministic(data):
  (x, y), (xt, yt) = data
  model = get_model("small_cnn", 10, width=8)
  tx = optax.sgd(0.05, momentum=0.9)
  runs = [train.fit(model, tx, x, y, batch_size=64, num_epochs=3, seed=3, progress=False)
          for _ in range(2)]
  (state, history), (state2, _) = runs
  chex.assert_trees_all_equal(state.params, state2.params)
  assert history[-1]["loss"] < history[0]["loss"]
  logits = model.apply(state.variables, jnp.asarray(xt), train=False)
  assert np.mean(np.argmax(logits, -1) == yt) > 0.8  # chance is 0.1
  assert int(state.step) == 3 * (2048 // 64)


def test_train_step_matches_manual_sgd(data):
  (x, y), _ = data
  model = get_model("mlp", 10, hidden=(8,))
  tx = optax.sgd(0.1)
  state = train.create_train_state(model, tx, jax.random.key(0), jnp.asarray(x[:2]))
  params0 = state.params
  batch = {"image": jnp.asarray(x[:16]), "label": jnp.asarray(y[:16])}
  grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, batch["image"]), batch["label"]).mean())(params0)
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, params0, grads)
  new_state, metrics = train.train_step(state, batch, jax.random.key(1),
                                        loss_fn=train.ClassificationLoss(model.apply), tx=tx)
  chex.assert_trees_all_close(new_state.params, expected, rtol=1e-5, atol=1e-6)
  assert int(new_state.step) == 1
  assert set(metrics) == {"loss", "accuracy", "grad_norm", "param_norm"}
  np.testing.assert_allclose(metrics["param_norm"], optax.tree.norm(expected), rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)


def _noise_loss(params, batch_stats, batch, rng):
  """A loss whose gradient is the step's random draw: params move by -lr * draw."""
  draw = jax.random.normal(rng, params["w"].shape)
  return jnp.sum(params["w"] * draw), (batch_stats, {})


def test_step_randomness_is_fold_in_of_root_key_and_step():
  root = jax.random.key(7)
  tx = optax.sgd(1.0)
  params = {"w": jnp.zeros(3)}
  state = train.TrainState(step=jnp.asarray(5, jnp.int32), params=params, batch_stats={},
                           opt_state=tx.init(params))
  state, _ = train.train_step(state, {}, root, loss_fn=jax.tree_util.Partial(_noise_loss), tx=tx)
  state, _ = train.train_step(state, {}, root, loss_fn=jax.tree_util.Partial(_noise_loss), tx=tx)
  expected = -(jax.random.normal(jax.random.fold_in(root, 5), (3,)) +
               jax.random.normal(jax.random.fold_in(root, 6), (3,)))
  np.testing.assert_allclose(state.params["w"], expected, rtol=1e-6)


def test_sgd_is_torch_sgd_with_weight_decay_in_the_gradient():
  lr, mu, wd = 0.1, 0.9, 0.01
  tx = train.sgd(lr, momentum=mu, weight_decay=wd)
  p = jnp.asarray([1.0, -2.0])
  state = tx.init(p)
  grads = [jnp.asarray([0.5, 0.25]), jnp.asarray([-1.0, 2.0])]
  p_ref, buf = np.array([1.0, -2.0]), np.zeros(2)
  for g in grads:  # torch.optim.SGD: d = g + wd p; buf = mu buf + d; p -= lr buf
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
    buf = mu * buf + (np.asarray(g) + wd * p_ref)
    p_ref = p_ref - lr * buf
  np.testing.assert_allclose(p, p_ref, rtol=1e-6)


def test_make_optimizer_takes_a_learning_rate_override():
  opt = ml_collections.ConfigDict({"learning_rate": 0.1, "momentum": 0.9, "weight_decay": 0.0,
                                   "schedule": "constant", "decay_every_epochs": 0,
                                   "decay_factor": 0.1})
  _, own = train.make_optimizer(opt, num_steps=10, steps_per_epoch=5)
  _, override = train.make_optimizer(opt, num_steps=10, steps_per_epoch=5, learning_rate=0.001)
  assert float(own(3)) == pytest.approx(0.1) and float(override(3)) == pytest.approx(0.001)


def test_step_schedule_decays_every_k_epochs():
  schedule = train.learning_rate_schedule("step", 0.1, total_steps=100 * 10, steps_per_epoch=10,
                                          decay_every_epochs=40, decay_factor=0.1)
  for step, expected in [(0, 0.1), (399, 0.1), (400, 0.01), (799, 0.01), (800, 0.001),
                         (999, 0.001)]:
    np.testing.assert_allclose(schedule(step), expected, rtol=1e-6)
  cosine = train.learning_rate_schedule("cosine", 0.2, total_steps=10)
  np.testing.assert_allclose([cosine(0), cosine(5), cosine(10)], [0.2, 0.1, 0.0], atol=1e-7)
  with pytest.raises(ValueError, match="valid schedules"):
    train.learning_rate_schedule("linear", 0.1, total_steps=10)


def test_non_finite_loss_raises_with_its_step(data):
  (x, y), _ = data
  model = get_model("mlp", 10, hidden=(8,))
  with pytest.raises(finite.NonFiniteError, match=r"diverged at step \d+"):
    train.fit(model, optax.sgd(1e30), x, y, batch_size=64, num_epochs=2, seed=0,
              progress=False)


def test_fit_with_one_nan_image_is_refused_before_training(data):
  (x, y), _ = data
  x = x.copy()
  x[700, 2, 2, 1] = np.nan  # was: fit "succeeded" with NaN parameters
  model = get_model("small_cnn", 10, width=4)
  with pytest.raises(finite.NonFiniteError, match=r"fit: 1 of the 2048 training images hold "
                                                  r"NaN or infinity \(first: index 700\)"):
    train.fit(model, optax.sgd(0.01), x, y, batch_size=64, num_epochs=1, seed=0,
              progress=False)


def _tiny_loop(workdir, num_steps, poison=None, **option_kwargs):
  """train_loop on a 1-device mesh for an MLP on prototype images."""
  (x, y) = make_prototype_images(1, 256, image_size=8, noise=0.8)
  model = get_model("mlp", 10, hidden=(16,))
  tx = train.sgd_cosine(0.05, 32)
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  init_fn = functools.partial(train.create_train_state, model, tx, jax.random.key(0),
                              jnp.zeros((1, 8, 8, 3)))
  step_fn = functools.partial(train.train_step, root_key=jax.random.key(1),
                              loss_fn=train.ClassificationLoss(model.apply), tx=tx)

  def batch_fn(step):
    idx = train.epoch_permutation(0, step // 8, 256)[(step % 8) * 32:(step % 8 + 1) * 32]
    return mesh_lib.shard_batch({"image": x[idx], "label": y[idx]}, mesh)

  options = train.LoopOptions(num_steps=num_steps, log_every=3, checkpoint_every=5,
                              progress=False, **option_kwargs)
  return train.train_loop(init_fn, (poison or (lambda f: f))(step_fn), batch_fn, str(workdir),
                          options, mesh=mesh, eval_fn=lambda s: {"eval/step_seen": int(s.step)})


def _saved_steps(workdir):
  with checkpoint.Checkpointer(str(workdir / train.CHECKPOINT_DIR)) as ckpt:
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


def test_diverging_train_task_writes_no_result_and_no_bad_checkpoint(tmp_path):
  config = train_configs.get_config("cpu_cue,quicktest")
  config.optimizer.learning_rate = 1e3  # was: exit 0, NaN parameters, a normal final_eval
  with pytest.raises(finite.NonFiniteError, match="diverged at step"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / train.FINAL_EVAL_FILE).exists()
  _saved_steps(tmp_path)  # every checkpoint left is finite


def test_a_diverged_run_is_refused_as_a_model(tmp_path):
  config = train_configs.get_config("cpu_cue,quicktest")
  train.train_and_evaluate(config, str(tmp_path))
  with checkpoint.Checkpointer(str(tmp_path / train.CHECKPOINT_DIR)) as ckpt:
    state = ckpt.read()
    state["params"]["head"]["bias"] = state["params"]["head"]["bias"] * np.nan
    ckpt.save(1000, state)  # as an older mechconn could have left it
  with pytest.raises(finite.NonFiniteError, match=r"checkpoints/1000 \(first at params/head/bias"):
    train.load_trained(str(tmp_path))


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


def test_epoch_permutation_depends_only_on_seed_and_epoch():
  a = train.epoch_permutation(0, 1, 100)
  np.testing.assert_array_equal(a, train.epoch_permutation(0, 1, 100))
  assert not np.array_equal(a, train.epoch_permutation(0, 2, 100))
  assert sorted(a) == list(range(100))


def test_overwrite_replaces_the_run_and_keeps_the_users_files(tmp_path):
  config = train_configs.get_config("cpu_cue,quicktest")
  train.train_and_evaluate(config, str(tmp_path))
  (tmp_path / "notes.md").write_text("mine")
  (tmp_path / train.CHECKPOINT_DIR / "best_by_hand").mkdir()
  (tmp_path / train.CHECKPOINT_DIR / "best_by_hand" / "weights.npz").write_text("mine")
  other = train_configs.get_config("cpu_cue,quicktest")
  other.seed = 3
  with pytest.raises(FileExistsError, match=r"differs in \['seed'\]"):
    train.train_and_evaluate(other, str(tmp_path))
  record = train.train_and_evaluate(other, str(tmp_path), overwrite=True)
  assert record["config"]["seed"] == 3
  assert (tmp_path / "notes.md").read_text() == "mine"
  assert (tmp_path / train.CHECKPOINT_DIR / "best_by_hand" / "weights.npz").read_text() == "mine"
  steps = [r["step"] for r in workdir_lib.read_metrics(str(tmp_path / workdir_lib.METRICS_FILE))
           if "train/loss" in r]
  assert steps == sorted(set(steps))  # one run's metrics, not two appended


def test_a_workdir_held_by_a_live_job_is_refused(tmp_path):
  hold = ("import sys, time\nfrom mechconn import workdir\n"
          "with workdir.lock(sys.argv[1]):\n  print('holding', flush=True)\n  time.sleep(60)\n")
  holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "holding"
    with pytest.raises(workdir_lib.WorkdirBusyError, match=rf"pid {holder.pid}"):
      train.train_and_evaluate(train_configs.get_config("cpu_cue,quicktest"), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [workdir_lib.LOCK_FILE]
  finally:
    holder.kill()
    holder.wait()
