r"""Dry-runs every paper preset of every task config and the language-model presets (or those
matching --only); one line each.

  python -m experiments.dry_run_presets                       # all tasks, all paper presets
  python -m experiments.dry_run_presets --only=train.py:cifar10_box80

Each preset goes through the task exactly as `experiments.main` with
`--config.dry_run=True` would run it (in this one process, to share imports):
it builds, runs the timed steps on zero batches and prints the estimate; the
compiled programs are dropped after each. A failing preset is reported and the
sweep goes on; the exit status is 1 if any failed.
"""

import gc
import json
import sys
import time
import traceback

from absl import app
from absl import flags
import jax

from experiments.configs import eval_path, fit_curve, reproduce, train
from mechconn import tasks

_ONLY = flags.DEFINE_string("only", "", "Run only the presets whose 'file:preset' contains this.")


def presets() -> list[tuple[str, object]]:
  """(name 'file.py:preset', config module) for every paper preset of every task config, and
  the language model's train and eval_path presets."""
  names = train.paper_presets()
  box = [p for p in names if "_box" in p]
  out = [(f"train.py:{p}", train) for p in names]
  out += [(f"fit_curve.py:{p}_{fit}", fit_curve) for p in box if "_box0_" not in p
          for fit in fit_curve.FIT_DATA]
  out += [(f"eval_path.py:{p}", eval_path) for p in box if "_box0_" not in p]
  out += [(f"reproduce.py:{p}", reproduce) for p in names
          if not any(f"{c}0_" in p or f"{c}100_" in p for c in ("box", "dominoes"))]
  out += [(f"train.py:{p}", train) for p in train.LM_PRESETS]
  out += [(f"eval_path.py:{eval_path.LM_PRESET}{m}", eval_path) for m in ("", ",repair")]
  return out


def main(argv):
  del argv
  failed = []
  for name, module in presets():
    if _ONLY.value not in name:
      continue
    config = module.get_config(name.split(":", 1)[1])
    config.dry_run = True
    start = time.perf_counter()
    try:
      record = tasks.run(config, "/nonexistent/dry_run_workdir")
    except Exception:  # report and go on: the sweep's point is to list every failure
      failed.append(name)
      print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
      continue
    print("PRESET " + json.dumps({
        "preset": name, "mesh": record["mesh"], "estimate_hours":
        round(record["estimate_seconds"] / 3600, 2),
        "per_device_batch": [s["per_device_batch"] for s in record["steps"]],
        "dry_run_seconds": round(time.perf_counter() - start, 1)}), flush=True)
    del record
    jax.clear_caches()  # compiled programs of full-width models add up over 120 presets
    gc.collect()
  print(f"{len(failed)} failed: {failed}" if failed else "every preset dry-ran")
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  app.run(main)
