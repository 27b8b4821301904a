"""Path evaluation spread over 8 fake CPU devices equals the one-device run.

The devices exist only in a subprocess started with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/sharded_path_worker.py).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mechconn.data.views import VIEWS


@pytest.fixture(scope="module")
def results(repo):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, str(repo / "tests" / "sharded_path_worker.py")],
                        cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.mark.slow
@pytest.mark.parametrize("num_t, expected_layout", [(16, "t"), (11, "t"), (3, "data")])
@pytest.mark.parametrize("run", ["mesh", "mesh_global_arrays", "mesh_chunked"])
def test_eight_devices_match_one_device(results, num_t, expected_layout, run):
  assert results["num_devices"] == 8
  single, sharded = results[str(num_t)]["single"], results[str(num_t)][run]
  for view in VIEWS:
    assert single[view]["sharded_over"] == "none" and single[view]["num_devices"] == 1
    assert sharded[view]["sharded_over"] == expected_layout
    assert sharded[view]["num_devices"] == 8
    assert len(sharded[view]["loss"]) == num_t
    np.testing.assert_allclose(sharded[view]["loss"], single[view]["loss"], rtol=2e-5)
    np.testing.assert_allclose(sharded[view]["accuracy"], single[view]["accuracy"], atol=1e-6)


@pytest.mark.slow
def test_model_without_batchnorm_on_eight_devices(results):
  np.testing.assert_allclose(results["mlp"]["mesh"], results["mlp"]["single"], rtol=2e-5)
