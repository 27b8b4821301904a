"""The README's library snippet runs as written, and what it prints is what it computed."""

import contextlib
import io
import re

import jax
import numpy as np
import pytest


pytestmark = pytest.mark.slow  # trains two small networks


def _library_snippet(repo) -> str:
  with open(repo / "README.md") as f:
    text = f.read()
  section = text[text.index("## The library"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_library_snippet_runs_as_written(repo):
  namespace = {"__name__": "__readme__"}
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(_library_snippet(repo), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  result, aligned, per_view = namespace["result"], namespace["aligned"], namespace["per_view"]
  assert result.loss.shape == (11,) and set(per_view) == {"clean", "cue", "rand_cue", "rand_img"}
  np.testing.assert_allclose(per_view["clean"].loss, result.loss, rtol=1e-5)
  # The jitted pure core computes what the checked evaluate_path returned, and differentiates.
  np.testing.assert_allclose(namespace["core"](*(namespace[k] for k in ("params_a", "params_b"))),
                             result.loss, rtol=1e-5)
  grad_norm = sum(float(np.abs(np.asarray(g)).sum())
                  for g in jax.tree.leaves(namespace["mean_path_loss_grad"]))
  assert np.isfinite(grad_norm) and grad_norm > 0
  # Aligning the end point changes the path, not its end points' losses.
  np.testing.assert_allclose(np.asarray(aligned.loss)[[0, -1]], np.asarray(result.loss)[[0, -1]],
                             rtol=1e-4)
  # The end points learned the cue (chance is 0.1; 0.58 and 0.64 when this was written).
  assert min(float(np.asarray(per_view["cue"].accuracy)[i]) for i in (0, -1)) > 0.4
  assert out.getvalue() == (f"loss barrier {result.summary()['loss']:.3f}, "
                            f"aligned {aligned.summary()['loss']:.3f}\n")
