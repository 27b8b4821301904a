r"""Launches a mechconn job from an ml-collections config.

This file is short on purpose (as flax's examples/*/main.py): it parses
--config and --workdir, sets up logging and devices, and hands the config to
`mechconn.tasks.run`, which runs the task named by `config.task` through the
one prologue every task shares (checks, dry run, claim of the workdir). All
the work lives in `mechconn`; what can be launched, and its fields, are read
from the config files by `experiments.catalogue`.

  python -m experiments.main --config=experiments/configs/train.py:cpu_cue --workdir=/tmp/cue
  python -m experiments.main --config=experiments/configs/quickstart.py:quicktest \
      --workdir=/tmp/mc --config.path.num_t=11
  python -m experiments.main --list        # every preset of every config file, one line each
  python -m experiments.main --config=experiments/configs/train.py:cpu_cue --print_config

A misspelt config file, preset or field (`--config.optimizer.lr`), or a value
the task refuses, is one line on stderr (the traceback with --verbosity); a
dry run (`--config.dry_run=True`) and --print_config print the config first.

Multi-host (TPU pod slices, several GPU hosts): run the same command on every
host with --distributed (or with JAX_COORDINATOR_ADDRESS set); the mesh then
spans every host's devices. Logging: third-party INFO lines are kept off the
terminal (--verbosity=0 or MECHCONN_VERBOSITY=0 shows them).
"""

import importlib.util
import logging as std_logging
import os
import pathlib
import re
import sys
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from experiments import catalogue
from mechconn import tasks
from mechconn import timing

__doc__ += catalogue.help_text()  # absl's --help prints the docstring: every preset's name

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results and checkpoints.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace a run of a different config in --workdir.")
_LIST = flags.DEFINE_bool("list", False, "Print every config file, preset and modifier with "
                          "its line, and exit.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the config (after overrides, "
                                  "checked by its task), and exit: no --workdir, nothing written.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-host jobs).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-host without a cluster "
    "manager jax detects; implies --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (with "
                                      "--coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with "
                                   "--coordinator_address).")
_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "h", "?")
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")
_CONFIG_FLAG = re.compile(r"^--?config(?:=(.*))?$")


def _fail(message: str, status: int = 2) -> NoReturn:
  """Prints 'error: `message`' to stderr and exits with `status` (2: the command line)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def _one_line(error: Exception) -> str:
  return " ".join(str(error).splitlines())


def _config_module(path: str):
  """The config module at `path` (the catalogue's, for the config files it lists)."""
  if pathlib.Path(path).resolve().parent == catalogue.CONFIG_DIR:
    return importlib.import_module(f"experiments.configs.{pathlib.Path(path).stem}")
  spec = importlib.util.spec_from_file_location("launched_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def command_line_problem(argv: list[str]) -> str | None:
  """Why `argv` (flags, no program name) names a config file, preset or field that does not
  exist, checked against the loaded config (not absl's error text); None if it names none."""
  values = [(m.group(1) if m.group(1) is not None else next(iter(argv[i + 1:]), ""))
            for i, m in enumerate(map(_CONFIG_FLAG.match, argv)) if m]
  if not values:
    return None
  path, _, preset = values[-1].partition(":")
  if not os.path.isfile(path):
    return (f"--config: no config file {path!r}; the config files: "
            f"{', '.join(f.path for f in catalogue.config_files())}")
  try:
    module = _config_module(path)
    config = module.get_config(preset) if preset else module.get_config()
  except ValueError as e:  # an unknown preset or modifier
    return f"{_one_line(e)}\n{catalogue.presets_hint(path, preset)}"
  for arg in argv:
    match = _OVERRIDE.match(arg)
    problem = match and catalogue.override_problem(config, match.group(1))
    if problem:
      return f"{arg.partition('=')[0]}: {problem}"
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, a command line's faults refused in one line (see `main`)."""
  try:
    args = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)  # as config_flags
    if not any(a.lstrip("-").split("=")[0] in _HELP_FLAGS for a in args):
      problem = command_line_problem(args)
      if problem:
        _fail(problem)
    return flags.FLAGS(argv)
  except flags.Error as e:  # a value of the wrong type, an unknown flag, ...
    _fail(_one_line(e))


def _set_verbosity() -> None:
  """WARNING and above unless --verbosity (or MECHCONN_VERBOSITY) asks for more."""
  if flags.FLAGS["verbosity"].present:
    return
  if "MECHCONN_VERBOSITY" in os.environ:
    value = os.environ["MECHCONN_VERBOSITY"]
    try:
      logging.set_verbosity(int(value))
    except ValueError:
      _fail(f"MECHCONN_VERBOSITY={value!r} is not an integer; expected absl's verbosity (0: "
            "INFO, -1: WARNING, 1 and up: debug levels), or unset it.")
  else:
    logging.set_verbosity(logging.WARNING)
  std_logging.getLogger().setLevel(std_logging.getLevelName(
      logging.get_absl_logger().getEffectiveLevel()))


def _checked_config():
  """--config, refused in one line (the traceback with --verbosity) where its task's
  `resolve` refuses a field, for this job's devices."""
  config = _CONFIG.value
  try:
    task = tasks.task_of(config)  # before any distributed setup
  except ValueError as e:
    _fail(_one_line(e))
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value or "JAX_COORDINATOR_ADDRESS" in os.environ:
    jax.distributed.initialize()  # TPU pods, SLURM, Open MPI, ...: detected by jax
  logging.info("JAX process %d of %d; devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  try:
    task.resolve(config, jax.device_count())
  except (ValueError, AttributeError, TypeError) as e:
    if flags.FLAGS["verbosity"].present:
      raise
    _fail(_one_line(e), status=1)
  return config


def _print_config(config) -> None:
  """The config, a `field = value` line each, under the command that made it."""
  flag = flags.FLAGS["config"]
  overrides = "".join(f" --config.{path}={value!r}"
                      for path, value in config_flags.get_override_values(flag).items())
  print(f"# --config={config_flags.get_config_filename(flag)}{overrides} (task {config.task}, "
        f"resolved for {jax.device_count()} devices)")
  print(catalogue.config_text(config), flush=True)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]} (flags are --name=value)")
  _set_verbosity()
  if _LIST.value:
    print(catalogue.list_text())
    return
  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config=experiments/configs/quickstart.py; --list "
          "shows every config file and preset.")
  if not _PRINT_CONFIG.value and not (_WORKDIR.value or "").strip():
    _fail(f"--workdir is {'empty' if _WORKDIR.value is not None else 'required'}; give the "
          "directory for the run's results, e.g. --workdir=/tmp/run.")
  timing.mark_launch()  # the job's wall-time breakdowns count from the process's start
  config = _checked_config()
  if _PRINT_CONFIG.value or config.get("dry_run", False):
    _print_config(config)
  if _PRINT_CONFIG.value:
    return
  tasks.run(config, _WORKDIR.value, overwrite=_OVERWRITE.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
