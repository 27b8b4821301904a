"""Launches a mechconn job from an ml-collections config.

This file is short on purpose (as flax's examples/*/main.py): it parses
--config and --workdir, sets up logging and devices, and hands the config to
`mechconn.tasks.run`, which runs the task named by `config.task` through the
one prologue every task shares (checks, dry run, claim of the workdir). All
the work lives in `mechconn`.

  python -m experiments.main --config=experiments/configs/train.py:cpu_cue --workdir=/tmp/cue
  python -m experiments.main --config=experiments/configs/quickstart.py:quicktest \
      --workdir=/tmp/mc --config.path.num_t=11

Multi-host (TPU pod slices, several GPU hosts): run the same command on every
host with --distributed (or with JAX_COORDINATOR_ADDRESS set); the mesh then
spans every host's devices.

Logging: third-party INFO lines (orbax writes about 150 per launch) are kept off
the terminal, so the result or the error is what a run prints last; pass
--verbosity=0 (absl's INFO) or set MECHCONN_VERBOSITY=0 to see them. Progress
bars and warnings always show.
"""

import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mechconn import tasks

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results and checkpoints.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace a run of a different config in --workdir.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-host jobs).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-host without a cluster "
    "manager jax detects; implies --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (with "
                                      "--coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with "
                                   "--coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def _set_verbosity() -> None:
  """WARNING and above unless --verbosity (or MECHCONN_VERBOSITY) asks for more."""
  if flags.FLAGS["verbosity"].present:
    return
  if "MECHCONN_VERBOSITY" in os.environ:
    value = os.environ["MECHCONN_VERBOSITY"]
    try:
      logging.set_verbosity(int(value))
    except ValueError:
      raise app.UsageError(f"MECHCONN_VERBOSITY={value!r} is not an integer; expected absl's "
                           "verbosity (0: INFO, -1: WARNING, 1 and up: debug levels), or "
                           "unset it.") from None
  else:
    logging.set_verbosity(logging.WARNING)
  std_logging.getLogger().setLevel(std_logging.getLevelName(
      logging.get_absl_logger().getEffectiveLevel()))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  _set_verbosity()
  if not _WORKDIR.value.strip():
    raise app.UsageError("--workdir is empty; give the directory for the run's results, "
                         "e.g. --workdir=/tmp/run.")
  config = _CONFIG.value
  try:
    tasks.task_of(config)  # before any distributed setup
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value or "JAX_COORDINATOR_ADDRESS" in os.environ:
    jax.distributed.initialize()  # TPU pods, SLURM, Open MPI, ...: detected by jax
  logging.info("JAX process %d of %d; devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  tasks.run(config, _WORKDIR.value, overwrite=_OVERWRITE.value)


if __name__ == "__main__":
  app.run(main)
