"""Degenerate setups are refused before the workdir is claimed, naming the problem.

The library's input checks are in test_input_checks.py, the workdir's and the
loop's in test_workdir.py and test_loop.py; here: the tasks' and the launcher's.
"""

import numpy as np
import pytest

from experiments.configs import eval_path as eval_path_config
from mechconn import tasks
from mechconn.models import get_model
from mechconn.tasks import model_checks
from mechconn.tasks import runs
from mechconn.tasks import specs



def _run(checkpoint, params, dtype="float32"):
  return runs.TrainedModel(model=None, params=params, batch_stats={},
                           config={"model": {"name": "mlp", "kwargs": {}, "dtype": dtype}},
                           checkpoint=checkpoint)


def test_the_same_run_or_identical_weights_at_both_ends_are_refused_unless_asked(tmp_path):
  a = {"Dense_0": {"kernel": np.ones((2, 3), np.float32)}}
  b = {"Dense_0": {"kernel": np.full((2, 3), 2.0, np.float32)}}
  ckpt = str(tmp_path / "a" / "checkpoints" / "24")
  with pytest.raises(ValueError, match=r"the same run .*flat by construction.*"
                                       r"allow_identical_endpoints=True"):
    runs.check_distinct(_run(ckpt, a), _run(ckpt + "/", a), allow_identical=False)
  with pytest.raises(ValueError, match=r"two runs of identical weights"):
    runs.check_distinct(_run(ckpt, a), _run(str(tmp_path / "b"), dict(a)),
                        allow_identical=False)
  runs.check_distinct(_run(ckpt, a), _run(ckpt, a), allow_identical=True)  # asked
  runs.check_distinct(_run(ckpt, a), _run(str(tmp_path / "b"), b),
                      allow_identical=False)


def test_end_points_of_different_dtypes_are_refused():
  with pytest.raises(ValueError, match=r"differ in model.dtype: 'float32' vs 'bfloat16'"):
    runs.check_endpoints(_run("a", {}), _run("b", {}, "bfloat16"), data=None)


def test_post_relu_sites_on_a_network_without_relu_are_refused():
  for name in ("small_cnn", "mlp"):
    model_checks.check_activation_sites("post_relu", get_model(name, 10), (16, 16, 3))
  vit = get_model("vit", 10)
  with pytest.raises(ValueError, match=r"'post_relu' applies a ReLU.*ViT calls no jax.nn.relu.*"
                                       r"'module_outputs'"):
    model_checks.check_activation_sites("post_relu", vit, (16, 16, 3))
  model_checks.check_activation_sites("module_outputs", vit, (16, 16, 3))


def test_unbiased_bn_variance_without_batchnorm_is_refused_before_the_claim(tmp_path):
  """Judged on the end points' model (here the dry run's stand-in, the runs being absent)
  when they are loaded, before the claim."""
  config = eval_path_config.get_config("cpu,quicktest")
  config.unlock()
  config.endpoint_model.name, config.endpoint_model.kwargs = "mlp", {"hidden": [8]}
  config.path.bn_variance = "unbiased"
  config.start_workdir, config.end_workdir = str(tmp_path / "a"), str(tmp_path / "b")
  config.dry_run = True
  with pytest.raises(ValueError, match=r"bn_variance='unbiased' but MLP has no BatchNorm"):
    tasks.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  assert model_checks.check_bn_variance(specs.path_spec(config.path),
                                        get_model("small_cnn", 10), (16, 16, 3)) is None


@pytest.mark.slow
def test_launcher_argument_faults_are_named(tmp_path, launch):
  config = "--config=experiments/configs/quickstart.py:quicktest"
  proc = launch(config, "--workdir=", timeout=120)
  assert proc.returncode != 0 and "--workdir is empty" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = launch(config, f"--workdir={tmp_path / 'w'}", env={"MECHCONN_VERBOSITY": "abc"},
                timeout=120)
  assert proc.returncode != 0 and "MECHCONN_VERBOSITY='abc' is not an integer" in proc.stderr
  assert "Traceback" not in proc.stderr and not (tmp_path / "w").exists()
