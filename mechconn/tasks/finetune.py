"""The `finetune` task: one fine-tuning method and seed from a finished cue model.

The method engine (heads, steps, seed ensembles, resumable runs) is
`tasks.methods`, shared with the `reproduce` study. Writes result.json (the
views of the fine-tuned model) beside the loop's checkpoints and metrics.
"""

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from mechconn import config_checks as checks
from mechconn import counterfactual
from mechconn import dry_run as dry_run_lib
from mechconn import finetune
from mechconn import loop
from mechconn.tasks import data as task_data
from mechconn.tasks import methods
from mechconn.tasks import records
from mechconn.tasks import runner
from mechconn.tasks import runs
from mechconn.tasks import specs

NAME = "finetune"
RESULT_FILE = "result.json"
LAYOUT = dataclasses.replace(loop.LAYOUT, files=loop.LAYOUT.files + (RESULT_FILE,))


@dataclasses.dataclass(frozen=True)
class FinetuneTaskSpec:
  """A `finetune` config, resolved."""

  method: str
  seed: int  # the clean/cue draw and the fine-tuning run
  cue_model_workdir: str
  finetune: methods.FinetuneSpec
  test_cue_proportion: float  # of each class's test examples the cue views treat
  eval_batch_size: int
  dry_run: bool


def resolve(config: ml_collections.ConfigDict, num_devices: int) -> FinetuneTaskSpec:
  """A `finetune` config, checked (the set sizes against the cue model's data: `inputs`)."""
  checks.check_int(config.seed, "seed")
  checks.check_choice(config.method, finetune.METHODS, "method")
  if tuple(config.finetune.methods) != (config.method,):
    raise ValueError(f"config.finetune.methods={tuple(config.finetune.methods)} but this task "
                     f"fine-tunes config.method={config.method!r} alone: set "
                     f"finetune.methods=('{config.method}',) (the study runs several).")
  checks.check_number(config.data.test_cue_proportion, "data.test_cue_proportion", low=0.0,
                      high=1.0)
  if not config.cue_model_workdir:
    raise ValueError("config.cue_model_workdir is empty: give the workdir of a finished train "
                     "run.")
  return FinetuneTaskSpec(
      method=config.method, seed=config.seed, cue_model_workdir=config.cue_model_workdir,
      finetune=methods.finetune_spec(config.finetune, num_devices, (config.method,)),
      test_cue_proportion=config.data.test_cue_proportion,
      eval_batch_size=specs.eval_batch_size(config.eval_batch_size, num_devices),
      dry_run=config.dry_run)


@dataclasses.dataclass(frozen=True)
class Inputs:
  cue_model: runs.TrainedModel
  data: specs.ImageData  # the cue model's data, its views at this run's test cue proportion


def inputs(spec: FinetuneTaskSpec, dry_run: bool) -> tuple[Inputs, dict]:
  """The cue model (needed by a dry run too: its model is the one fine-tuned)."""
  del dry_run  # a dry run fine-tunes the cue model too: it must exist
  cue_model = runs.load_trained(spec.cue_model_workdir)
  if cue_model.spec.is_sequence:
    raise ValueError(f"config.cue_model_workdir={spec.cue_model_workdir!r} holds a language "
                     f"model trained on {cue_model.config['data']['dataset']!r}; the finetune "
                     "task fine-tunes image classifiers trained on a cued dataset.")
  recorded = {**records.upgrade(cue_model.config)["data"],
              "test_cue_proportion": spec.test_cue_proportion}
  data = specs.data_spec(specs.section(recorded), NAME)
  methods.check_set_sizes(spec.finetune, data.num_train_examples)
  return Inputs(cue_model, data), {"cue_model": runs.run_identity(cue_model)}


def build(spec: FinetuneTaskSpec, mesh: jax.sharding.Mesh, inputs: Inputs,
          params: Any = None) -> runner.Build:
  """The method's loop for spec.seed from `params` (default: the cue model's)."""
  shared = methods.method_loop(spec.method, spec.finetune, inputs.cue_model, mesh)
  return methods.build_seeds(shared, inputs.cue_model,
                             [inputs.cue_model.params if params is None else params],
                             [spec.seed], mesh, inputs.data.input_shape)


def run(spec: FinetuneTaskSpec, job: runner.Job) -> dict:
  """One method and seed from the cue model; returns the result.json record."""
  cue_model, data = job.inputs.cue_model, job.inputs.data
  split, test_views, test_labels = task_data.load_data(data)
  ft = spec.finetune
  clean_split, cue_split = task_data.split_clean_and_cue(split, ft.num_clean, ft.num_cue,
                                                         spec.seed, ft.cbft.cue_set)
  view_batches = task_data.shard_views(test_views, test_labels, spec.eval_batch_size, job.mesh)
  (out,) = methods.run_method(spec.method, [spec.seed], cue_model, clean_split, cue_split,
                              view_batches, ft, [job.workdir], job.mesh,
                              pipeline_mode=data.pipeline, run_configs=[job.config_dict])
  record = {"method": spec.method, "seed": spec.seed, "views": out["views"],
            "cue_model": cue_model.checkpoint, "cue_model_data": cue_model.config["data"],
            "num_clean": len(clean_split), "num_cue": len(cue_split),
            "seconds": out["seconds"], "config": job.config_dict}
  runner.write_outputs(job.workdir, {RESULT_FILE: record})
  print(counterfactual.format_view_table(out["views"], f"{spec.method}, seed {spec.seed}:"))
  return record


def dry_run(spec: FinetuneTaskSpec, job: runner.Job) -> dict:
  """One timed step of the method's loop (lp and dfr fit a head only: nothing to time)."""
  timings, placements = [], {}
  if finetune.METHODS[spec.method].runs_loop:
    state, timing, batch = runner.time_build(build(spec, job.mesh, job.inputs), job.mesh)
    timings, placements = [timing], {"state": state, "batch": batch}
  return dry_run_lib.report(f"finetune: {spec.method} seed {spec.seed} from "
                            f"{os.path.abspath(spec.cue_model_workdir)}", job.mesh, placements,
                            timings)
