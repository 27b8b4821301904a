"""Shared test setup: the repository root on sys.path, and the `slow` marker.

`REPO` is the repository root (tests launch `python -m experiments.main` there
and import `experiments.configs.*`). End-to-end tests that launch subprocesses
or train whole tiny runs are marked `slow`: `pytest -m "not slow"` is the fast
inner loop; CI runs everything.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # configs import each other as experiments.configs.*
