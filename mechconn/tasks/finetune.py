"""The `finetune` task (one method, one seed) and what the study shares with it.

Fine-tuning starts from a finished cue model (a `train` run) and uses a small
clean set drawn from the cue model's own training split (and, for CBFT, a
disjoint cue set: `tasks.data.split_clean_and_cue`). What a method is (its head,
its step, the settings it reads) is `mechconn.finetune.METHODS`; here it is
turned into a run: `start_variables` fits the head (or initialises scratch),
`build` makes the loop's init and step for one seed, or for several seeds at
once as one vmapped `SeedEnsemble`, and `run_method` runs them (checkpointed,
resumable).
"""

import dataclasses
import functools
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mechconn import config_checks as checks
from mechconn import counterfactual
from mechconn import dry_run as dry_run_lib
from mechconn import finetune
from mechconn import loop
from mechconn import mesh as mesh_lib
from mechconn import rngs
from mechconn import step as step_lib
from mechconn.tasks import config as task_config
from mechconn.tasks import data as task_data
from mechconn.tasks import runner
from mechconn.tasks import runs
from mechconn.tasks import sequences as task_sequences

NAME = "finetune"
RESULT_FILE = "result.json"
LAYOUT = dataclasses.replace(loop.LAYOUT, files=loop.LAYOUT.files + (RESULT_FILE,))


# --- Checks and data. -------------------------------------------------------------


def check_finetune_config(config: Any, num_devices: int) -> None:
  """Validates the fine-tuning fields shared by `finetune` and `reproduce` configs."""
  checks.check_int(config.seed, "seed")
  ft = config.finetune
  if not ft.methods:
    raise ValueError("config.finetune.methods is empty; valid methods: "
                     f"{list(finetune.METHODS)}.")
  for method in ft.methods:
    finetune.check_method(method)
  checks.check_positive_int(ft.num_clean, "finetune.num_clean")
  if ft.num_cue != -1:
    checks.check_positive_int(ft.num_cue, "finetune.num_cue", " (or -1: the rest)")
  checks.check_choice(ft.cbft.t_distribution, finetune.T_DISTRIBUTIONS,
                      "finetune.cbft.t_distribution")
  task_data.cue_set_of(ft)
  task_config.check_loop_config(ft, num_devices, prefix="finetune.")
  checks.check_number(ft.naive.learning_rate, "finetune.naive.learning_rate", low=0.0,
                      low_open=True)
  checks.check_number(ft.lp.learning_rate, "finetune.lp.learning_rate", low=0.0, low_open=True)
  if "scratch" in ft.methods or config.get("method") == "scratch":
    checks.check_number(ft.scratch.learning_rate, "finetune.scratch.learning_rate", low=0.0,
                        low_open=True)
  checks.check_positive_int(ft.lp.num_epochs, "finetune.lp.num_epochs")
  checks.check_number(ft.dfr.l2, "finetune.dfr.l2", low=0.0)
  checks.check_number(ft.cbft.margin, "finetune.cbft.margin", low=0.0)
  checks.check_number(ft.cbft.invariance_weight, "finetune.cbft.invariance_weight", low=0.0)
  checks.check_int(ft.cbft.warmup_epochs, "finetune.cbft.warmup_epochs")
  task_config.cbft_schedule(ft.cbft, 1)
  task_config.check_eval_batch_size(config, num_devices)


def check_set_sizes(ft: Any, num_train: int, methods: tuple[str, ...], *, bn_examples: int = 0,
                    eval_batch_size: int = 1) -> None:
  """The clean and cue sets fit the training split, and each makes a batch (before any work)."""
  num_cue = task_data.set_sizes(num_train, ft.num_clean, ft.num_cue)
  task_config.steps_of(ft.batch_size, ft.num_epochs, ft.num_clean, prefix="finetune.")
  if any(finetune.METHODS[m].step == "cbft" for m in methods) and num_cue < ft.batch_size:
    raise ValueError(f"config.finetune.num_cue={num_cue} makes no CBFT cue batch of "
                     f"finetune.batch_size={ft.batch_size}.")
  if bn_examples and min(bn_examples, num_cue) < eval_batch_size:
    raise ValueError(f"config.path.bn_examples={bn_examples} (of {num_cue} cue examples) makes "
                     f"no full BatchNorm batch of eval_batch_size={eval_batch_size}.")


def method_parts(method: str, clean_split, cue_split, batch_size: int, mesh: jax.sharding.Mesh,
                 seed: int | list[int], mode: str = "auto"):
  """(parts, assemble) for `tasks.data.loop_inputs`: the clean batches in `seed`'s order and,
  for CBFT, the cue batches in the order of seed + `rngs.CUE_BATCH_SEED_OFFSET`."""
  clean = task_data.StepBatches(clean_split, batch_size, mesh, mode)
  if finetune.METHODS[method].step != "cbft":
    return {"batch": (clean, seed)}, lambda b: b["batch"]
  offset = rngs.CUE_BATCH_SEED_OFFSET
  cue_seed = [s + offset for s in seed] if isinstance(seed, list) else seed + offset
  cue = task_data.StepBatches(cue_split, batch_size, mesh, mode)

  def assemble(b):
    return {"clean_image": b["clean"]["image"], "clean_label": b["clean"]["label"],
            "cue_image": b["cue"]["image"], "cue_label": b["cue"]["label"]}

  return {"clean": (clean, seed), "cue": (cue, cue_seed)}, assemble


def _cbft_batch(zeros: dict) -> dict:
  """A zero {'image', 'label'} batch as CBFT's clean and cue halves (dry runs)."""
  return {"clean_image": zeros["image"], "clean_label": zeros["label"],
          "cue_image": zeros["image"], "cue_label": zeros["label"]}


# --- Methods as runs. -------------------------------------------------------------


def start_variables(method: str, seed: int, cue_model: runs.TrainedModel, clean_split,
                    ft: Any) -> tuple[Any, Any]:
  """(params, batch_stats) a method starts from (`Method.head`): the cue model's with the head
  it fits, or for 'init' (scratch) the network freshly initialised with its own key
  (`rngs.scratch_init_key`: seed 0 is not the cue model's own initialisation)."""
  if finetune.METHODS[method].head == "init":
    image = clean_split.examples(np.arange(1))["image"]
    fresh = jax.jit(cue_model.model.init)(rngs.scratch_init_key(seed), image)
    return fresh["params"], fresh.get("batch_stats", {})
  return start_params(method, seed, cue_model, clean_split, ft), cue_model.batch_stats


def start_params(method: str, seed: int, cue_model: runs.TrainedModel, clean_split,
                 ft: Any) -> Any:
  """The cue model's params with the head the method starts from (`Method.head`)."""
  spec = finetune.METHODS[method]
  model, params = cue_model.model, cue_model.params
  if spec.head == "none":
    return params
  examples = clean_split.examples(np.arange(len(clean_split)))
  images, labels = examples["image"], examples["label"]
  if spec.head == "dfr":
    idx = finetune.balanced_subset(labels, model.num_classes, seed)
    images, labels = images[idx], labels[idx]
  feats = finetune.extract_features(model.apply, cue_model.variables, images)
  if spec.head == "dfr":
    head = finetune.fit_dfr_head(feats, labels, model.num_classes, l2=ft.dfr.l2)
  else:
    head = finetune.fit_head(feats, labels, model.num_classes, epochs=ft.lp.num_epochs,
                             learning_rate=ft.lp.learning_rate, batch_size=ft.batch_size,
                             seed=seed)
  return finetune.with_head(params, head)


@flax.struct.dataclass
class SeedEnsemble:
  """Several seeds' train states stacked on a leading axis, advanced by one vmapped step."""

  step: jax.Array  # scalar: the loop's step (every member's step equals it)
  members: step_lib.TrainState  # leaves [num_seeds, ...]


# Vmapped seeds turn each convolution over per-seed weights into a grouped convolution,
# which cuDNN runs slowly; as patches + matmul (`models.layers`) it becomes a batched
# matmul. On one H200 (benchmarks/seed_ensemble.py, 3 seeds x batch 128): vmapped with
# cuDNN convolutions 0.29-0.58x the speed of seeds in turn, with patches 1.11-1.69x.
ENSEMBLE_CONV_IMPL = {"gpu": "patches"}


@dataclasses.dataclass(frozen=True)
class MethodLoop:
  """What every seed of a loop method shares: its optimiser, schedule and step."""

  method: str
  tx: Any
  schedule: Any
  member_step: Any  # (state, batch, root_key) -> (state, metrics)
  steps_per_epoch: int
  num_steps: int
  batch_size: int


def method_loop(method: str, ft: Any, cue_model: runs.TrainedModel, num_clean: int,
                mesh: jax.sharding.Mesh, conv_impl: str | None = None) -> MethodLoop:
  """The method's optimiser (the shared `finetune.optimizer` with the method's learning
  rate, `Method.learning_rate_from`) and step (`Method.step`), built once for all seeds.

  `conv_impl` replaces the model's convolution implementation in the step (same
  parameters; e.g. 'patches' for vmapped seeds, see `ENSEMBLE_CONV_IMPL`).
  """
  spec = finetune.METHODS[method]
  if not spec.runs_loop:
    raise ValueError(f"Method {method!r} runs no loop (it only fits a head).")
  steps_per_epoch, num_steps = task_config.steps_of(ft.batch_size, ft.num_epochs, num_clean,
                                                    prefix="finetune.")
  rate_from = spec.learning_rate_from
  shared, held = (task_config.cbft_schedule(ft.cbft, steps_per_epoch) if spec.step == "cbft"
                  else (1, 0))
  tx, schedule = task_config.make_optimizer(
      ft.optimizer, num_steps=num_steps, steps_per_epoch=steps_per_epoch,
      learning_rate=ft[rate_from].learning_rate if rate_from else None,
      updates_per_step=shared, hold_steps=held)
  model = cue_model.model
  if conv_impl is not None and hasattr(model, "conv_impl"):
    model = model.clone(conv_impl=conv_impl)
  if spec.step == "cbft":
    loss_fn = mesh_lib.replicate(finetune.CBFTLoss(
        model.apply, cue_model.params, model.num_classes, margin=ft.cbft.margin,
        invariance_weight=ft.cbft.invariance_weight, t_distribution=ft.cbft.t_distribution,
        barrier_loss=ft.cbft.get("barrier_loss", True)), mesh)
    member_step = functools.partial(finetune.cbft_step, loss_fn=loss_fn, tx=tx,
                                    warmup_steps=ft.cbft.warmup_epochs * steps_per_epoch)
  else:
    member_step = functools.partial(step_lib.train_step,
                                    loss_fn=step_lib.ClassificationLoss(model.apply), tx=tx)
  return MethodLoop(method, tx, schedule, member_step, steps_per_epoch, num_steps,
                    ft.batch_size)


def build_seeds(shared: MethodLoop, cue_model: runs.TrainedModel, params: list, seeds: list,
                mesh: jax.sharding.Mesh, image_shape: tuple[int, ...], *,
                ensemble: bool = False, batch_stats: list | None = None) -> runner.Build:
  """The loop of one seed, or of several as one vmapped `SeedEnsemble`.

  `params[i]` and `batch_stats[i]` (default: the cue model's) are seed i's start
  (`start_variables`); seed i's steps are keyed by
  `rngs.step_key(seed)`. Each seed draws the same batches and keys either way.
  """
  member_step = shared.member_step
  batch_stats = batch_stats or [cue_model.batch_stats] * len(seeds)

  def fresh(p, stats):
    return step_lib.fresh_state(p, shared.tx, stats)

  if ensemble:
    keys = mesh_lib.replicate(jnp.stack([rngs.step_key(s) for s in seeds]), mesh)

    @functools.partial(jax.jit, donate_argnums=0)
    def step_fn(state, batch):
      members, metrics = jax.vmap(member_step)(state.members, batch, keys)
      return SeedEnsemble(step=state.step + 1, members=members), metrics

    def init_fn():
      members = jax.tree.map(lambda *xs: jnp.stack(xs),
                             *[fresh(p, s) for p, s in zip(params, batch_stats)])
      return SeedEnsemble(step=jnp.zeros((), jnp.int32), members=members)
  else:
    (seed,), (p,), (stats,) = seeds, params, batch_stats
    step_fn = functools.partial(member_step,
                                root_key=mesh_lib.replicate(rngs.step_key(seed), mesh))
    init_fn = functools.partial(fresh, p, stats)
  seeds_text = f"seeds {list(seeds)}" if ensemble else f"seed {seeds[0]}"
  cbft = finetune.METHODS[shared.method].step == "cbft"
  return runner.Build(name=f"{shared.method} {seeds_text}", init_fn=init_fn, step_fn=step_fn,
                      batch_size=shared.batch_size, steps_per_epoch=shared.steps_per_epoch,
                      num_steps=shared.num_steps, image_shape=image_shape,
                      schedule=shared.schedule, model=cue_model.model,
                      to_batch=_cbft_batch if cbft else lambda b: b)


def run_method(method: str, seeds: list[int], cue_model: runs.TrainedModel, clean_split,
               cue_split, view_batches, ft: Any, workdirs: list[str], mesh, *,
               ensemble: bool = False, pipeline_mode: str = "auto",
               run_configs: list[dict] | None = None) -> list[dict]:
  """Fine-tunes the cue model with one method for each seed: [{'variables', 'views', ...}].

  Loop methods run `loop.train_loop`, checkpointed and resumable: one loop per
  seed in `workdirs[i]`, or with `ensemble` one loop over a `SeedEnsemble` in
  `workdirs[0]`; `run_configs[i]` (the config claimed in `workdirs[i]`) is
  recorded with its checkpoints. `pipeline_mode`: where batches are drawn
  (`tasks.data`).
  """
  start = time.perf_counter()
  params, batch_stats = map(list, zip(*[
      start_variables(method, seed, cue_model, clean_split, ft) for seed in seeds]))
  image_shape = clean_split.examples(np.arange(1))["image"].shape[1:]
  if finetune.METHODS[method].runs_loop:
    shared = method_loop(method, ft, cue_model, len(clean_split), mesh,
                         conv_impl=ENSEMBLE_CONV_IMPL.get(jax.default_backend())
                         if ensemble else None)
    run_configs = run_configs or [None] * len(workdirs)
    groups = [(list(seeds), params, batch_stats, workdirs[0], run_configs[0])] if ensemble else [
        ([s], [p], [b], w, c)
        for s, p, b, w, c in zip(seeds, params, batch_stats, workdirs, run_configs)]
    for i, (group_seeds, group_params, group_stats, workdir, run_config) in enumerate(groups):
      built = build_seeds(shared, cue_model, group_params, group_seeds, mesh, image_shape,
                          ensemble=ensemble, batch_stats=group_stats)
      parts, assemble = method_parts(method, clean_split, cue_split, ft.batch_size, mesh,
                                     group_seeds if ensemble else group_seeds[0],
                                     pipeline_mode)
      step_fn, batch_fn = task_data.loop_inputs(built.step_fn, parts, assemble)
      state = loop.train_loop(
          built.init_fn, step_fn, batch_fn, workdir,
          task_config.loop_options(ft, built.num_steps, built.steps_per_epoch, built.name),
          mesh=mesh, learning_rate_fn=built.schedule,
          examples_per_step=ft.batch_size * len(group_seeds), run_config=run_config)
      if ensemble:
        params = [jax.tree.map(lambda x, i=i: x[i], state.members.params)
                  for i in range(len(seeds))]
        batch_stats = [jax.tree.map(lambda x, i=i: x[i], state.members.batch_stats)
                       for i in range(len(seeds))]
      else:
        params[i], batch_stats[i] = state.params, state.batch_stats
  seconds = round((time.perf_counter() - start) / len(seeds), 1)
  outs = []
  for p, stats in zip(params, batch_stats):
    variables = {"params": p, "batch_stats": stats} if stats else {"params": p}
    outs.append({"variables": variables,
                 "views": runs.evaluate_views(cue_model.model.apply, variables, view_batches),
                 "seconds": seconds})
  return outs


# --- The `finetune` task. ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Inputs:
  cue_model: runs.TrainedModel
  data: task_config.AttrDict  # the cue model's recorded data section


def check(config: Any, num_devices: int) -> None:
  """Validates a `finetune` config (the set sizes are checked against the cue model's data)."""
  check_finetune_config(config, num_devices)
  checks.check_choice(config.method, finetune.METHODS, "method")
  checks.check_number(config.get("test_cue_proportion", 1.0), "test_cue_proportion", low=0.0,
                      high=1.0)
  if not config.cue_model_workdir:
    raise ValueError("config.cue_model_workdir is empty: give the workdir of a finished train "
                     "run.")


def inputs(config: Any, dry_run: bool) -> tuple[Inputs, dict]:
  """The cue model (needed by a dry run too: its model is the one fine-tuned)."""
  del dry_run
  cue_model = runs.load_trained(config.cue_model_workdir)
  dataset = cue_model.config["data"]["dataset"]
  if task_sequences.is_sequence_data(dataset):
    raise ValueError(f"config.cue_model_workdir={config.cue_model_workdir!r} holds a language "
                     f"model trained on {dataset!r}; the finetune task fine-tunes image "
                     "classifiers trained on a cued dataset.")
  # The cue model's data, its test views treated at this run's test cue proportion.
  data = task_config.AttrDict({**cue_model.config["data"],
                               "test_cue_proportion": config.get("test_cue_proportion", 1.0)})
  check_set_sizes(config.finetune, task_config.num_train_examples(data), (config.method,))
  return Inputs(cue_model, data), {"cue_model": runs.run_identity(cue_model)}


def build(config: Any, mesh: jax.sharding.Mesh, inputs: Inputs,
          params: Any = None) -> runner.Build:
  """The method's loop for config.seed from `params` (default: the cue model's)."""
  shared = method_loop(config.method, config.finetune, inputs.cue_model,
                       config.finetune.num_clean, mesh)
  return build_seeds(shared, inputs.cue_model,
                     [inputs.cue_model.params if params is None else params], [config.seed],
                     mesh, task_config.input_shape(inputs.data))


def run(config: Any, workdir: str, mesh: jax.sharding.Mesh, inputs: Inputs,
        config_dict: dict, *, overwrite: bool = False) -> dict:
  """One method and seed from the cue model; returns the result.json record."""
  del overwrite  # the claim, made by runner.launch, already used it
  cue_model = inputs.cue_model
  split, test_views, test_labels = task_data.load_data(inputs.data)
  ft = config.finetune
  clean_split, cue_split = task_data.split_clean_and_cue(split, ft.num_clean, ft.num_cue,
                                                         config.seed, task_data.cue_set_of(ft))
  view_batches = task_data.shard_views(test_views, test_labels, config.eval_batch_size, mesh)
  (out,) = run_method(config.method, [config.seed], cue_model, clean_split, cue_split,
                      view_batches, ft, [workdir], mesh,
                      pipeline_mode=inputs.data.get("pipeline", "auto"), run_configs=[config_dict])
  record = {"method": config.method, "seed": config.seed, "views": out["views"],
            "cue_model": cue_model.checkpoint, "cue_model_data": cue_model.config["data"],
            "num_clean": len(clean_split), "num_cue": len(cue_split),
            "seconds": out["seconds"], "config": config_dict}
  runner.write_outputs(workdir, {RESULT_FILE: record})
  print(counterfactual.format_view_table(out["views"],
                                         f"{config.method}, seed {config.seed}:"))
  return record


def dry_run(config: Any, mesh: jax.sharding.Mesh, inputs: Inputs) -> dict:
  """One timed step of the method's loop (lp and dfr fit a head only: nothing to time)."""
  timings, placements = [], {}
  if finetune.METHODS[config.method].runs_loop:
    state, timing, batch = runner.time_build(build(config, mesh, inputs), mesh)
    timings, placements = [timing], {"state": state, "batch": batch}
  return dry_run_lib.report(f"finetune: {config.method} seed {config.seed} from "
                            f"{os.path.abspath(config.cue_model_workdir)}", mesh, placements,
                            timings)
