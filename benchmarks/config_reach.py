r"""How far a config reaches: the modules it is handed to during one launch of the study.

For every Python call in mechconn whose arguments include an
`ml_collections.ConfigDict`, records the callee's module; prints one JSON line:
the modules visited (first-visit order), the sequence, and how many times the
chain returns to a module it had already left ("climbs_back"). Runs the
`reproduce.py:cpu,quicktest` study (its cue model's own launch included) in a
temporary directory:

  python benchmarks/config_reach.py
"""

import json
import os
import sys
import tempfile

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.configs import reproduce as reproduce_config  # pylint: disable=g-import-not-at-top
from mechconn import tasks  # pylint: disable=g-import-not-at-top

visits = []


def profiler(frame, event, arg):
  del arg  # sys.setprofile's signature
  if event != "call":
    return
  module = frame.f_globals.get("__name__", "")
  if not module.startswith("mechconn"):
    return
  code = frame.f_code
  names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
  args = [frame.f_locals.get(n) for n in names]
  if any(isinstance(a, ml_collections.ConfigDict) for a in args):
    if not visits or visits[-1] != module:
      visits.append(module)

def main():
  config = reproduce_config.get_config("cpu,quicktest")
  with tempfile.TemporaryDirectory() as d:
    sys.setprofile(profiler)
    try:
      tasks.run(config, d)
    finally:
      sys.setprofile(None)
  modules = list(dict.fromkeys(visits))
  print(json.dumps({"modules": len(modules), "climbs_back": len(visits) - len(modules),
                    "visited": modules,
                    "sequence": [v.replace("mechconn.", "") for v in visits]}))


if __name__ == "__main__":
  main()
