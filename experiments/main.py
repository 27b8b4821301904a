"""Launches a mechconn job from an ml-collections config.

This file is short on purpose (as flax's examples/*/main.py): it parses
--config and --workdir, sets up logging, and hands the config to one library
driver chosen by `config.task`. All the work lives in `mechconn`.

  python -m experiments.main --config=experiments/configs/quickstart.py --workdir=/tmp/mc
  python -m experiments.main --config=experiments/configs/quickstart.py:quicktest \
      --workdir=/tmp/mc --config.num_t=11
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mechconn import drivers

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])

TASKS = {"linear_barrier": drivers.linear_barrier}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config.task not in TASKS:
    raise app.UsageError(f"Unknown task {config.task!r}; valid tasks: {sorted(TASKS)}.")
  logging.info("JAX devices: %s", jax.devices())
  TASKS[config.task](config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
