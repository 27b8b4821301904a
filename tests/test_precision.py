"""bfloat16 compute (`model.dtype`): float32 parameters, statistics and losses; barriers agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import train as train_configs
from mechconn import barriers, loop, step as step_lib, tasks, workdir as workdir_lib
from mechconn.data.batching import stack_batches
from mechconn.data.prototypes import make_prototype_images
from mechconn.models import get_model
from mechconn.tasks import records, runs, specs

# Measured on the 2-core CPU (SmallCNN(8), 2 epochs on prototype images, 11 t, 512 test
# images): bfloat16 vs float32 losses along the path differ by at most 2e-4, accuracies by
# one example (0.004), the loss barrier by 2e-5 and the error barrier by 4e-4. Tolerances:
LOSS_TOL, ACCURACY_TOL = 2e-3, 0.01


@pytest.fixture(scope="module")
def data():
  return make_prototype_images(1, 2048, image_size=16, noise=0.8)


@pytest.fixture(scope="module")
def end_points(data):
  x, y = data
  test = make_prototype_images(2, 512, image_size=16, noise=0.8)
  model = get_model("small_cnn", 10, width=8)
  states = [loop.fit(model, step_lib.sgd_cosine(0.05, 64), x, y, batch_size=64, num_epochs=2,
                     seed=s, progress=False)[0] for s in (0, 1)]
  return (x, y), test, states


@pytest.mark.slow  # trains the two end points
def test_bfloat16_barrier_curve_matches_float32_within_tolerance(end_points):
  (x, y), (xt, yt), states = end_points
  eval_batches = stack_batches(xt, yt, 128)
  bn_batches = stack_batches(x[:512], y[:512], 128, drop_remainder=True)
  points = (states[0].params, states[1].params)
  ts = np.linspace(0, 1, 11)
  results = {}
  for dtype in (None, jnp.bfloat16):
    model = get_model("small_cnn", 10, width=8, dtype=dtype)
    results[dtype] = jax.device_get(barriers.evaluate_path(model.apply, points, ts,
                                                           eval_batches, bn_batches=bn_batches))
  f32, bf16 = results[None], results[jnp.bfloat16]
  assert not np.array_equal(f32.loss, bf16.loss)  # the compute did change precision
  np.testing.assert_allclose(bf16.loss, f32.loss, atol=LOSS_TOL)
  np.testing.assert_allclose(bf16.accuracy, f32.accuracy, atol=ACCURACY_TOL)
  a, b = f32.summary(), bf16.summary()
  assert abs(a["loss"] - b["loss"]) <= LOSS_TOL and abs(a["error"] - b["error"]) <= ACCURACY_TOL
  assert a["loss"] > 0.05  # a real barrier, not two equal zeros


def test_a_bfloat16_step_keeps_float32_parameters_and_loss(data):
  x, y = data
  model = get_model("small_cnn", 10, width=8, dtype=jnp.bfloat16)
  tx = step_lib.sgd_cosine(0.05, 100)
  state = step_lib.create_train_state(model, tx, jax.random.key(0), jnp.asarray(x[:2]))
  logits = model.apply(state.variables, jnp.asarray(x[:4]))
  assert logits.dtype == jnp.bfloat16  # computes in bfloat16 ...
  losses = []
  for i in range(8):
    rows = slice(i * 64, (i + 1) * 64)
    batch = {"image": jnp.asarray(x[rows]), "label": jnp.asarray(y[rows])}
    state, metrics = step_lib.train_step(state, batch, jax.random.key(1),
                                         loss_fn=step_lib.ClassificationLoss(model.apply), tx=tx)
    losses.append(float(metrics["loss"]))
  dtypes = {leaf.dtype for leaf in jax.tree.leaves((state.params, state.batch_stats))}
  assert dtypes == {jnp.dtype(jnp.float32)}  # ... with float32 parameters and statistics
  assert metrics["loss"].dtype == jnp.float32 and np.isfinite(losses).all()
  assert losses[-1] < losses[0]


def test_model_dtype_is_a_config_field_and_old_runs_read_as_float32():
  config = train_configs.get_config("cpu_cue,quicktest")
  assert config.model.dtype == "float32"
  recorded = workdir_lib.config_to_dict(config)
  del recorded["model"]["dtype"]  # a run recorded before the field existed
  assert workdir_lib.config_differences(recorded, workdir_lib.config_to_dict(config),
                                        records.VOCABULARY) == []
  upgraded = records.upgrade(recorded)
  assert specs.model_spec(specs.section(upgraded["model"]), dataset="shapes10").build(
      ).dtype is None
  config.model.dtype = "bfloat16"
  assert workdir_lib.config_differences(recorded, workdir_lib.config_to_dict(config),
                                        records.VOCABULARY) == ["model.dtype"]
  assert specs.model_spec(config.model, dataset="shapes10").build().dtype == jnp.bfloat16
  config.model.dtype = "float16"
  with pytest.raises(ValueError, match=r"config.model.dtype='float16'.*'bfloat16', 'float32'"):
    tasks.train.resolve(config, num_devices=1)


@pytest.mark.slow
def test_the_train_task_runs_in_bfloat16(tmp_path):
  config = train_configs.get_config("cpu_cue,quicktest")
  config.model.dtype = "bfloat16"
  record = tasks.run(config, str(tmp_path))
  trained = runs.load_trained(str(tmp_path))
  assert trained.model.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(trained.params)} == {jnp.dtype(jnp.float32)}
  assert all(np.isfinite(r["loss"]) for r in record["views"].values())
