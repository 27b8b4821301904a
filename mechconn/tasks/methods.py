"""The fine-tuning methods as runs: what the `finetune` task and the study share.

A fine-tuning run starts from a finished cue model (a `train` run) and uses a
small clean set drawn from the cue model's own training split (and, for CBFT,
a disjoint cue set: `tasks.data.split_clean_and_cue`). What a method is (its
head, its step, the settings it reads) is `mechconn.finetune.METHODS`; here it
is turned into a run: `start_variables` fits the head (or initialises
scratch), `method_loop` and `build_seeds` make the loop's init and step for one
seed, or for several seeds at once as one vmapped `SeedEnsemble`, and
`run_method` runs them (checkpointed, resumable). `finetune_spec` resolves the
`finetune` config section they read.
"""

from collections.abc import Mapping
import dataclasses
import functools
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mechconn import config_checks as checks
from mechconn import finetune
from mechconn import loop
from mechconn import mesh as mesh_lib
from mechconn import rngs
from mechconn import step as step_lib
from mechconn import trees
from mechconn.data import steps as data_steps
from mechconn.tasks import data as task_data
from mechconn.tasks import optim
from mechconn.tasks import runner
from mechconn.tasks import runs
from mechconn.tasks import specs

# How CBFT's learning rate advances: per iteration (both updates at its rate, as the official
# scheduler), per iteration only after the warm-up (as the official script), or per update.
SCHEDULE_PER = ("iteration", "iteration_after_warmup", "update")


@dataclasses.dataclass(frozen=True)
class CBFTSpec:
  """CBFT's settings (`finetune.cbft`)."""

  margin: float  # m in |m - CE| of the barrier step
  invariance_weight: float  # lambda
  warmup_epochs: int  # epochs without the invariance loss
  t_distribution: str
  barrier_loss: bool  # False: the ablation without the barrier step
  schedule_per: str  # SCHEDULE_PER
  cue_set: str  # task_data.CUE_SETS


@dataclasses.dataclass(frozen=True)
class FinetuneSpec:
  """A `finetune` section, resolved: the methods, the sets, the loop and each method's
  settings."""

  methods: tuple[str, ...]
  num_clean: int
  num_cue: int  # -1: the rest of the split
  loop: specs.LoopSpec
  learning_rates: Mapping[str, float]  # of 'naive', 'scratch' and 'lp' (the head's SGD)
  lp_epochs: int
  dfr_l2: float
  cbft: CBFTSpec


def finetune_spec(ft: specs.Section, num_devices: int, methods: tuple[str, ...]
                  ) -> FinetuneSpec:
  """The checked `finetune` section of a config fine-tuning with `methods`."""
  if not methods:
    raise ValueError("config.finetune.methods is empty; valid methods: "
                     f"{list(finetune.METHODS)}.")
  for method in methods:
    finetune.check_method(method)
  checks.check_positive_int(ft.num_clean, "finetune.num_clean")
  if ft.num_cue != -1:
    checks.check_positive_int(ft.num_cue, "finetune.num_cue", " (or -1: the rest)")
  rates = {"naive": ft.naive.learning_rate, "lp": ft.lp.learning_rate,
           "scratch": ft.scratch.learning_rate}
  for name, rate in rates.items():
    if name != "scratch" or "scratch" in methods:
      checks.check_number(rate, f"finetune.{name}.learning_rate", low=0.0, low_open=True)
  checks.check_positive_int(ft.lp.num_epochs, "finetune.lp.num_epochs")
  checks.check_number(ft.dfr.l2, "finetune.dfr.l2", low=0.0)
  return FinetuneSpec(methods=tuple(methods), num_clean=ft.num_clean, num_cue=ft.num_cue,
                      loop=specs.loop_spec(ft, num_devices, ft.num_clean, "finetune."),
                      learning_rates=rates, lp_epochs=ft.lp.num_epochs, dfr_l2=ft.dfr.l2,
                      cbft=_cbft_spec(ft.cbft))


def _cbft_spec(cbft: specs.Section) -> CBFTSpec:
  checks.check_number(cbft.margin, "finetune.cbft.margin", low=0.0)
  checks.check_number(cbft.invariance_weight, "finetune.cbft.invariance_weight", low=0.0)
  checks.check_int(cbft.warmup_epochs, "finetune.cbft.warmup_epochs")
  checks.check_choice(cbft.t_distribution, finetune.T_DISTRIBUTIONS,
                      "finetune.cbft.t_distribution")
  checks.check_choice(cbft.schedule_per, SCHEDULE_PER, "finetune.cbft.schedule_per")
  checks.check_choice(cbft.cue_set, task_data.CUE_SETS, "finetune.cbft.cue_set")
  return CBFTSpec(margin=cbft.margin, invariance_weight=cbft.invariance_weight,
                  warmup_epochs=cbft.warmup_epochs, t_distribution=cbft.t_distribution,
                  barrier_loss=bool(cbft.barrier_loss), schedule_per=cbft.schedule_per,
                  cue_set=cbft.cue_set)


def check_set_sizes(ft: FinetuneSpec, num_train: int, *, bn_examples: int = 0,
                    eval_batch_size: int = 1) -> None:
  """The clean and cue sets fit the training split, and each makes a batch (before any work)."""
  num_cue = task_data.set_sizes(num_train, ft.num_clean, ft.num_cue)
  if any(finetune.METHODS[m].step == "cbft" for m in ft.methods) and num_cue < ft.loop.batch_size:
    raise ValueError(f"config.finetune.num_cue={num_cue} makes no CBFT cue batch of "
                     f"finetune.batch_size={ft.loop.batch_size}.")
  if bn_examples and min(bn_examples, num_cue) < eval_batch_size:
    raise ValueError(f"config.path.bn_examples={bn_examples} (of {num_cue} cue examples) makes "
                     f"no full BatchNorm batch of eval_batch_size={eval_batch_size}.")


def cbft_schedule(cbft: CBFTSpec, steps_per_epoch: int) -> tuple[int, int]:
  """(optimiser updates per CBFT iteration that share its learning rate, iterations held at
  the peak rate) of `cbft.schedule_per`: 'iteration' (both updates at the iteration's rate,
  as the official scheduler); 'iteration_after_warmup' (as the official script, whose
  scheduler steps only from epoch warmup_epochs + 1: the peak rate until then, the cosine
  from its start after, ending short of 0); 'update' (the schedule advancing per update, so
  reaching its end halfway)."""
  shared = 2 if cbft.schedule_per != "update" and cbft.barrier_loss else 1
  # From iteration D = (warmup_epochs + 1) epochs, the official step after iteration i sets
  # the rate of iteration i + 1 to schedule[i - D]: iteration j runs at schedule[j - D - 1].
  held = ((cbft.warmup_epochs + 1) * steps_per_epoch + 1
          if cbft.schedule_per == "iteration_after_warmup" else 0)
  return shared, held


def method_parts(method: str, clean_split, cue_split, batch_size: int, mesh: jax.sharding.Mesh,
                 seed: int | list[int], mode: str = "auto"):
  """(parts, assemble) for `data.steps.loop_inputs`: the clean batches in `seed`'s order and,
  for CBFT, the cue batches in the order of seed + `rngs.CUE_BATCH_SEED_OFFSET`."""
  clean = data_steps.StepBatches(clean_split, batch_size, mesh, mode)
  if finetune.METHODS[method].step != "cbft":
    return {"batch": (clean, seed)}, _the_batch
  offset = rngs.CUE_BATCH_SEED_OFFSET
  cue_seed = [s + offset for s in seed] if isinstance(seed, list) else seed + offset
  cue = data_steps.StepBatches(cue_split, batch_size, mesh, mode)
  return {"clean": (clean, seed), "cue": (cue, cue_seed)}, _cbft_assemble


# Module-level (one object each), so the seeds of a method share one compiled drawing step.
def _the_batch(b: dict) -> dict:
  return b["batch"]


def _cbft_assemble(b: dict) -> dict:
  return {"clean_image": b["clean"]["image"], "clean_label": b["clean"]["label"],
          "cue_image": b["cue"]["image"], "cue_label": b["cue"]["label"]}


def _cbft_batch(zeros: dict) -> dict:
  """A zero {'image', 'label'} batch as CBFT's clean and cue halves (dry runs)."""
  return {"clean_image": zeros["image"], "clean_label": zeros["label"],
          "cue_image": zeros["image"], "cue_label": zeros["label"]}


# --- Methods as runs. -------------------------------------------------------------


def start_variables(method: str, seed: int, cue_model: runs.TrainedModel, clean_split,
                    ft: FinetuneSpec) -> tuple[Any, Any]:
  """(params, batch_stats) a method starts from (`Method.head`): the cue model's with the head
  it fits, or for 'init' (scratch) the network freshly initialised with its own key
  (`rngs.scratch_init_key`: seed 0 is not the cue model's own initialisation)."""
  if finetune.METHODS[method].head == "init":
    image = clean_split.examples(np.arange(1))["image"]
    fresh = jax.jit(cue_model.model.init)(rngs.scratch_init_key(seed), image)
    return fresh["params"], fresh.get("batch_stats", {})
  return start_params(method, seed, cue_model, clean_split, ft), cue_model.batch_stats


def start_params(method: str, seed: int, cue_model: runs.TrainedModel, clean_split,
                 ft: FinetuneSpec) -> Any:
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
    head = finetune.fit_dfr_head(feats, labels, model.num_classes, l2=ft.dfr_l2)
  else:
    head = finetune.fit_head(feats, labels, model.num_classes, epochs=ft.lp_epochs,
                             learning_rate=ft.learning_rates["lp"],
                             batch_size=ft.loop.batch_size, seed=seed)
  return finetune.with_head(params, head)


@flax.struct.dataclass
class SeedEnsemble:
  """Several seeds' train states stacked on a leading axis, advanced by one vmapped step."""

  step: jax.Array  # scalar: the loop's step (every member's step equals it)
  members: step_lib.TrainState  # leaves [num_seeds, ...]


# Vmapped seeds turn each convolution over per-seed weights into a grouped convolution,
# which cuDNN runs slowly; as patches + matmul (`models.layers`) it becomes a batched
# matmul, faster than seeds in turn on a GPU (benchmarks/seed_ensemble.py measures both).
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


def method_loop(method: str, ft: FinetuneSpec, cue_model: runs.TrainedModel,
                mesh: jax.sharding.Mesh, conv_impl: str | None = None) -> MethodLoop:
  """The method's optimiser (the shared `finetune.optimizer` with the method's learning
  rate, `Method.learning_rate_from`) and step (`Method.step`), built once for all seeds.

  `conv_impl` replaces the model's convolution implementation in the step (same
  parameters; e.g. 'patches' for vmapped seeds, see `ENSEMBLE_CONV_IMPL`).
  """
  spec = finetune.METHODS[method]
  if not spec.runs_loop:
    raise ValueError(f"Method {method!r} runs no loop (it only fits a head).")
  steps_per_epoch, num_steps = ft.loop.steps(ft.num_clean, prefix="finetune.")
  rate_from = spec.learning_rate_from
  shared, held = (cbft_schedule(ft.cbft, steps_per_epoch) if spec.step == "cbft" else (1, 0))
  tx, schedule = optim.make_optimizer(
      ft.loop.optimizer, num_steps=num_steps, steps_per_epoch=steps_per_epoch,
      learning_rate=ft.learning_rates[rate_from] if rate_from else None,
      updates_per_step=shared, hold_steps=held)
  model = cue_model.model
  if conv_impl is not None and hasattr(model, "conv_impl"):
    model = model.clone(conv_impl=conv_impl)
  if spec.step == "cbft":
    loss_fn = mesh_lib.replicate(finetune.CBFTLoss(
        model.apply, cue_model.params, model.num_classes, margin=ft.cbft.margin,
        invariance_weight=ft.cbft.invariance_weight, t_distribution=ft.cbft.t_distribution,
        barrier_loss=ft.cbft.barrier_loss), mesh)
    member_step = functools.partial(finetune.cbft_step, loss_fn=loss_fn, tx=tx,
                                    warmup_steps=ft.cbft.warmup_epochs * steps_per_epoch)
  else:
    member_step = functools.partial(step_lib.train_step,
                                    loss_fn=step_lib.ClassificationLoss(model.apply), tx=tx)
  return MethodLoop(method, tx, schedule, member_step, steps_per_epoch, num_steps,
                    ft.loop.batch_size)


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
      members = trees.stack([fresh(p, s) for p, s in zip(params, batch_stats)])
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
               cue_split, view_batches, ft: FinetuneSpec, workdirs: list[str], mesh, *,
               ensemble: bool = False, pipeline_mode: str = "auto",
               run_configs: list[dict] | None = None) -> list[dict]:
  """Fine-tunes the cue model with one method for each seed: [{'variables', 'views', ...}].

  Loop methods run `loop.train_loop`, checkpointed and resumable: one loop per
  seed in `workdirs[i]`, or with `ensemble` one loop over a `SeedEnsemble` in
  `workdirs[0]`; `run_configs[i]` (the config claimed in `workdirs[i]`) is
  recorded with its checkpoints. `pipeline_mode`: where batches are drawn
  (`mechconn.data.steps`).
  """
  start = time.perf_counter()
  params, batch_stats = map(list, zip(*[
      start_variables(method, seed, cue_model, clean_split, ft) for seed in seeds]))
  image_shape = clean_split.examples(np.arange(1))["image"].shape[1:]
  if finetune.METHODS[method].runs_loop:
    shared = method_loop(method, ft, cue_model, mesh,
                         conv_impl=ENSEMBLE_CONV_IMPL.get(jax.default_backend())
                         if ensemble else None)
    run_configs = run_configs or [None] * len(workdirs)
    groups = [(list(seeds), params, batch_stats, workdirs[0], run_configs[0])] if ensemble else [
        ([s], [p], [b], w, c)
        for s, p, b, w, c in zip(seeds, params, batch_stats, workdirs, run_configs)]
    for i, (group_seeds, group_params, group_stats, workdir, run_config) in enumerate(groups):
      built = build_seeds(shared, cue_model, group_params, group_seeds, mesh, image_shape,
                          ensemble=ensemble, batch_stats=group_stats)
      parts, assemble = method_parts(method, clean_split, cue_split, ft.loop.batch_size, mesh,
                                     group_seeds if ensemble else group_seeds[0],
                                     pipeline_mode)
      step_fn, batch_fn = data_steps.loop_inputs(built.step_fn, parts, assemble)
      state = loop.train_loop(
          built.init_fn, step_fn, batch_fn, workdir,
          ft.loop.options(built.num_steps, built.steps_per_epoch, built.name),
          mesh=mesh, learning_rate_fn=built.schedule,
          examples_per_step=ft.loop.batch_size * len(group_seeds), run_config=run_config)
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
    variables = trees.variables_of(p, stats)
    outs.append({"variables": variables,
                 "views": runs.evaluate_views(cue_model.model.apply, variables, view_batches),
                 "seconds": seconds})
  return outs
