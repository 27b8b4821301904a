"""Shared test setup: the repository root on sys.path, a compilation cache, shared fixtures.

The repository root is on sys.path (tests import `experiments.configs.*`);
tests reach it through the `repo` fixture and launch `python -m
experiments.main` there through the `launch` fixture. End-to-end tests that launch subprocesses
or train whole tiny runs are marked `slow`: `pytest -m "not slow"` is the fast
inner loop; CI runs everything.

The suite compiles the same tiny programs many times, in this process, in
pytest-xdist's workers and in the launches tests make: one JAX persistent
compilation cache per session (a fresh directory, removed at the end; all of
them inherit it through the environment) compiles each once. Every test still
runs every program; `JAX_COMPILATION_CACHE_DIR` set by the user is kept.

Implicit rank promotion raises in the whole session (`JAX_NUMPY_RANK_PROMOTION=raise`,
inherited by the workers and the launched runs): `x_B + y_BxK` is a bug until an axis
is added on purpose (`x_B[:, None]`).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # configs import each other as experiments.configs.*

# The cache this process made (None: the user's, or one inherited from the process that
# made it: an xdist worker's, a launched run's). Only its maker removes it.
_MADE_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _MADE_CACHE = tempfile.mkdtemp(prefix="mechconn-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _MADE_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"
if "jax" in sys.modules:  # imported before this file (a plugin): tell it too
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_numpy_rank_promotion", "raise")
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 1)))


def pytest_sessionfinish():
  """The process that made the session's cache removes it (and its setting)."""
  if _MADE_CACHE is not None and os.environ.get("JAX_COMPILATION_CACHE_DIR") == _MADE_CACHE:
    del os.environ["JAX_COMPILATION_CACHE_DIR"]
    shutil.rmtree(_MADE_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def repo() -> pathlib.Path:
  """The repository root."""
  return pathlib.Path(REPO)


@pytest.fixture(scope="session")
def launch():
  """`launch(*args, env=None, timeout=300)`: `python -m experiments.main *args` run in the
  repository (env: variables added to this process's), its CompletedProcess (text)."""

  def run(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "experiments.main", *map(str, args)],
                          cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)

  return run

