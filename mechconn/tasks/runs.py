"""Finished runs as inputs of other tasks, and a model's evaluation on the views.

- `load_trained(workdir)`: the final model of a finished `train` run, refused
  when it is not finite; `run_identity(run)`: what identifies it (its recorded
  config and final step, not its path), recorded by every task that reads it.
- `model_of`, `apply_fn_of`: a `model` section's network for a dataset, and
  how mechconn calls it (an image model's `apply`; a language model's through
  `adapters.without_train`);
- `view_eval_fn`, `evaluate_views`: a model on the four counterfactual views
  (or any named eval sets, with their objective), as floats for records and
  logs.
"""

from collections.abc import Callable
import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mechconn import checkpoint
from mechconn import counterfactual
from mechconn import finite
from mechconn import loop
from mechconn import objectives
from mechconn import workdir as workdir_lib
from mechconn.data import datasets
from mechconn.models import get_model
from mechconn.objectives import Objective
from mechconn.tasks import sequences as task_sequences
from mechconn.types import ApplyFn, Params

FINAL_EVAL_FILE = "final_eval.json"  # what marks a `train` run finished


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A finished `train` run, loaded from its workdir."""

  model: nn.Module
  params: Params
  batch_stats: Params
  config: dict
  checkpoint: str

  @property
  def variables(self) -> dict[str, Params]:
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}


DTYPES = ("float32", "bfloat16")  # a `model` section's compute dtypes


def model_of(model_config: Any, dataset: str) -> nn.Module:
  """The model of a `model` section for a dataset's number of classes (for a sequence
  dataset: the language model for its vocabulary and sequence length).

  `dtype` ('float32', or 'bfloat16': bfloat16 compute with float32 parameters,
  BatchNorm statistics and losses; absent in runs recorded before it existed:
  float32) is the model's compute dtype.
  """
  dtype = model_config.get("dtype", "float32")
  dtype = None if dtype == "float32" else jnp.dtype(dtype)
  if task_sequences.is_sequence_data(dataset):
    return task_sequences.model_of(model_config, dataset, dtype)
  return get_model(model_config["name"], datasets.info(dataset).num_classes, dtype=dtype,
                   **model_config["kwargs"])


def apply_fn_of(model: nn.Module, dataset: str) -> ApplyFn:
  """`model.apply` as mechconn calls it (`apply_fn(variables, x, train=...)`): the image
  models' own, a sequence dataset's language model through `adapters.without_train`."""
  if task_sequences.is_sequence_data(dataset):
    return task_sequences.apply_fn_of(model)
  return model.apply


def load_trained(workdir: str) -> TrainedModel:
  """The final model of a finished `train` run (its config.json and last checkpoint).

  Raises:
    FileNotFoundError: no finished run there (no config.json or final_eval.json:
      relaunch the train command to finish it).
    ValueError: the workdir holds another task's run.
    finite.NonFiniteError: the run's last checkpoint is not finite (it diverged).
  """
  config_path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.exists(config_path) or not os.path.exists(
      os.path.join(workdir, FINAL_EVAL_FILE)):
    raise FileNotFoundError(
        f"{workdir} holds no finished train run (needs {workdir_lib.CONFIG_FILE} and "
        f"{FINAL_EVAL_FILE}); run or resume the train task there first.")
  with open(config_path) as f:
    config = json.load(f)
  if config.get("task") != "train":
    raise ValueError(f"{workdir} holds a {config.get('task')!r} run, not a 'train' run.")
  model = model_of(config["model"], config["data"]["dataset"])
  with checkpoint.Checkpointer(os.path.join(workdir, loop.CHECKPOINT_DIR)) as ckpt:
    step = ckpt.latest_step()
    state = ckpt.read(step)
  if not bool(finite.all_finite_jit(state)):
    raise finite.NonFiniteError(
        f"The train run in {workdir} ended with NaN or infinity in its checkpoint "
        f"{ckpt.step_dir(step)} (first at {finite.first_nonfinite_leaf(state)}): it diverged "
        "and cannot serve as a model. Retrain it (e.g. with a lower learning rate).")
  return TrainedModel(model=model, params=state["params"],
                      batch_stats=state.get("batch_stats", {}), config=config,
                      checkpoint=ckpt.step_dir(step))


def run_identity(run: TrainedModel) -> dict:
  """What identifies a finished run's model: its recorded config and final step.

  Not its path: a run retrained in place keeps the path, and a moved one keeps
  its identity.
  """
  return {"config": run.config, "step": int(os.path.basename(os.path.normpath(run.checkpoint)))}


def evaluate_views(apply_fn: ApplyFn, variables: dict, view_batches: counterfactual.ViewBatches,
                   objective: Objective = objectives.CLASSIFICATION
                   ) -> dict[str, dict[str, float]]:
  """{view: {'loss', 'accuracy'}} (the objective's metrics) as floats
  (`counterfactual.evaluate_views`, checked)."""
  results = jax.device_get(counterfactual.evaluate_views(apply_fn, variables, view_batches,
                                                         objective))
  return {view: {k: float(v) for k, v in r.items()} for view, r in results.items()}


def view_eval_fn(model_of_state: Callable[[Any], tuple[ApplyFn, dict]],
                 view_batches: counterfactual.ViewBatches,
                 objective: Objective = objectives.CLASSIFICATION) -> Callable[[Any], dict]:
  """state -> {'eval/<view>/<loss|accuracy>': float}, computed once per step.

  `model_of_state(state)` gives (apply_fn, variables) to evaluate on the
  views (or any named eval sets) with `objective`. The loop's last evaluation
  is also the final one: results are kept by step.
  """
  evaluated = {}

  def eval_fn(state):
    step = int(state.step)
    if step not in evaluated:
      apply_fn, variables = model_of_state(state)
      evaluated[step] = {f"eval/{view}/{k}": v for view, r in
                         evaluate_views(apply_fn, variables, view_batches, objective).items()
                         for k, v in r.items()}
    return evaluated[step]

  return eval_fn


def views_of(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
  """{'eval/cue/loss': ...} -> {'cue': {'loss': ...}}."""
  out: dict[str, dict[str, float]] = {}
  for key, value in metrics.items():
    _, view, name = key.split("/")
    out.setdefault(view, {})[name] = value
  return out
