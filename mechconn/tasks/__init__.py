"""Tasks: whole jobs built from the library, one module per task.

  train       a model on a cued dataset, evaluated on the four views (or a causal language
              model on embedded sequences, evaluated on held-out ones)
  fit_curve   a Bezier curve (or polygonal chain) between two finished train runs
  eval_path   LMC, aligned LMC and fitted curves on the four views; Definition 5 (and
              LMC, aligned LMC between two language models)
  finetune    one fine-tuning method and seed from a finished cue model
  reproduce   the paper's fine-tuning study (every method x seed, report)
  quickstart  two small models and the linear path between them, in seconds
  theory      the one-hidden-layer theory on two-attribute synthetic data (claim C13)
  merge       N models merged into one (none, MergeMany, synchronized alignment): the merged
              model on the views vs N, the simplex they span, pairwise barriers

Each task module resolves its config once (`resolve(config, num_devices)`:
every field checked, into the task's frozen, typed spec) and runs from the
spec; it is launched through `runner.launch` (resolve, inputs, dry run, claim,
run). Supporting modules:

  specs       the shared config sections as typed values (data, model, optimizer, loop, path)
  records     recorded configs read in today's fields (the upgrade of old runs)
  runner      the prologue, `Job`, `Build`, `write_outputs`
  runs        finished runs as inputs (train runs, end points, fitted curves), views
  methods     the fine-tuning methods as runs (shared by finetune and reproduce)
  data        a data section loaded: views, statistics batches, clean and cue sets
  optim       the optimiser and schedule of an optimizer section
  alignment   the end point aligned to the start (none, weight or activation matching)
  sequences   the language-model case: sequence data, its model and objective

A task takes an `ml_collections.ConfigDict` as its config and never parses files.
"""

import ml_collections

from mechconn.tasks import eval_path
from mechconn.tasks import finetune
from mechconn.tasks import fit_curve
from mechconn.tasks import merge
from mechconn.tasks import quickstart
from mechconn.tasks import reproduce
from mechconn.tasks import runner
from mechconn.tasks import theory
from mechconn.tasks import train

TASKS = {task.NAME: task for task in (train, fit_curve, eval_path, finetune, reproduce,
                                      quickstart, theory, merge)}


def task_of(config: ml_collections.ConfigDict) -> runner.Task:
  """The task module `config.task` names; ValueError naming the valid ones otherwise."""
  if config.task not in TASKS:
    raise ValueError(f"Unknown task {config.task!r}; valid tasks: {sorted(TASKS)}.")
  return TASKS[config.task]


def run(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False) -> dict:
  """Runs (or dry-runs) the task named by `config.task` in `workdir`; returns its record."""
  return runner.launch(task_of(config), config, workdir, overwrite=overwrite)
