"""The paper's fine-tuning study as tasks: `finetune` (one method, one seed) and `reproduce`.

`reproduce` runs the whole study for one dataset, cue and proportion: it
trains the cue model (or loads a finished train run), fine-tunes it with every
method for several seeds on a small clean set, evaluates each result on the
four views and measures the linear path from the cue model to each fine-tuned
model on cue data (the paper's Figure 5 logic: naive fine-tuning stays in the
cue model's basin, CBFT leaves it). It writes `reproduce.json` (every number),
`report.md` (the table, mean and standard deviation over seeds) and two
figures. Every piece resumes: finished runs are skipped, a killed run resumes
from its checkpoint.

Data: the clean set (`num_clean` examples, no cue) and the cue set (`num_cue`
examples, every one carrying the cue) are drawn without replacement from the
cue model's training split and are disjoint; the official code samples them
with replacement, so its clean and cue sets can overlap.
"""

from collections.abc import Callable
import contextlib
import dataclasses
import functools
import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mechconn import barriers
from mechconn import config_checks as checks
from mechconn import counterfactual
from mechconn import dry_run as dry_run_lib
from mechconn import finetune
from mechconn import mesh as mesh_lib
from mechconn import report
from mechconn import train
from mechconn import workdir as workdir_lib
from mechconn.data import batching
from mechconn.data import pipeline

RESULT_FILE = "result.json"
REPRODUCE_FILE = "reproduce.json"
REPORT_FILE = "report.md"

LOOP_METHODS = ("naive", "lp_ft", "cbft")  # methods that run train-loop steps
# What each task writes (all that --overwrite may delete). The study's --overwrite
# replaces its summary; each run under runs/ is its own claimed workdir recording the
# config that produced it: kept while that config is the current one (same numbers:
# runs are deterministic), otherwise refused, or with --overwrite cleared and redone.
RUN_LAYOUT = dataclasses.replace(train.LOOP_LAYOUT,
                                 files=train.LOOP_LAYOUT.files + (RESULT_FILE,))
FINETUNE_LAYOUT = RUN_LAYOUT
LAYOUT = workdir_lib.Layout(files=(REPRODUCE_FILE, REPORT_FILE, "views.png", "paths.png"))
SEED_MODES = ("auto", "sequential", "vmap")
# How `reproduce` runs the seeds of a loop method. Measured with
# benchmarks/seed_ensemble.py on the 2-core CPU (3 seeds, batch 128 each): one
# vmapped step is 0.52-0.78x the speed of three separate steps (XLA:CPU turns
# per-seed convolutions into slower grouped ones), so CPU runs them in turn.
# GPU and TPU have not been measured (no accelerator was lent to this work):
# vmap there, on the expectation that a small model's step leaves most of an
# accelerator idle; run the benchmark there and change this if it loses.
DEFAULT_SEED_MODE = {"cpu": "sequential", "gpu": "vmap", "tpu": "vmap"}


def seed_mode(mode: str) -> str:
  """'sequential' or 'vmap': `mode`, or the backend's default for 'auto'."""
  checks.check_choice(mode, SEED_MODES, "seed_mode")
  return DEFAULT_SEED_MODE.get(jax.default_backend(), "sequential") if mode == "auto" else mode


def split_clean_and_cue(split: pipeline.CueSplit, num_clean: int, num_cue: int, seed: int
                        ) -> tuple[pipeline.CueSplit, pipeline.CueSplit]:
  """Disjoint (clean set without cue, cue set all with cue), drawn without replacement."""
  n = len(split)
  num_cue = set_sizes(n, num_clean, num_cue)
  order = np.random.default_rng([seed, 7]).permutation(n)
  clean_idx, cue_idx = np.sort(order[:num_clean]), np.sort(order[num_clean:num_clean + num_cue])
  return split.subset(clean_idx, cued=False), split.subset(cue_idx, cued=True)


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
  train.check_optimization_config(ft, num_devices, prefix="finetune.")
  checks.check_number(ft.naive.learning_rate, "finetune.naive.learning_rate", low=0.0,
                      low_open=True)
  checks.check_number(ft.lp.learning_rate, "finetune.lp.learning_rate", low=0.0, low_open=True)
  checks.check_positive_int(ft.lp.num_epochs, "finetune.lp.num_epochs")
  checks.check_number(ft.dfr.l2, "finetune.dfr.l2", low=0.0)
  checks.check_number(ft.cbft.margin, "finetune.cbft.margin", low=0.0)
  checks.check_number(ft.cbft.invariance_weight, "finetune.cbft.invariance_weight", low=0.0)
  checks.check_int(ft.cbft.warmup_epochs, "finetune.cbft.warmup_epochs")
  checks.check_positive_int(config.eval_batch_size, "eval_batch_size")
  mesh_lib.check_batch_size(config.eval_batch_size, num_devices, "config.eval_batch_size")
  checks.check_int(config.path.num_t, "path.num_t", minimum=2)


def check_study_config(config: Any, num_devices: int) -> None:
  """Validates a `reproduce` config, and that its sets fit the cue model's training split."""
  train.check_train_config(config.train, num_devices)
  check_finetune_config(config, num_devices)
  checks.check_seeds(config.seeds, "seeds")
  checks.check_choice(config.seed_mode, SEED_MODES, "seed_mode")
  checks.check_positive_int(config.path.bn_examples, "path.bn_examples")
  check_set_sizes(config.finetune, dry_run_lib.num_train_examples(config.train.data),
                  tuple(config.finetune.methods), bn_examples=config.path.bn_examples,
                  eval_batch_size=config.eval_batch_size)


def set_sizes(num_train: int, num_clean: int, num_cue: int) -> int:
  """The number of cue examples (num_cue, or -1: the rest); raises unless both sets fit."""
  num_cue = num_train - num_clean if num_cue == -1 else num_cue
  if num_cue < 1 or num_clean + num_cue > num_train:
    raise ValueError(f"config.finetune.num_clean={num_clean} + finetune.num_cue={num_cue} "
                     f"exceed the {num_train} training examples of the cue model's data (the "
                     "clean and cue sets are disjoint).")
  return num_cue


def check_set_sizes(ft: Any, num_train: int, methods: tuple[str, ...], *, bn_examples: int = 0,
                    eval_batch_size: int = 1) -> None:
  """The clean and cue sets fit the training split, and each makes a batch (before any work)."""
  num_cue = set_sizes(num_train, ft.num_clean, ft.num_cue)
  train.steps_of(ft, ft.num_clean, prefix="finetune.")
  if "cbft" in methods and num_cue < ft.batch_size:
    raise ValueError(f"config.finetune.num_cue={num_cue} makes no CBFT cue batch of "
                     f"finetune.batch_size={ft.batch_size}.")
  if bn_examples and min(bn_examples, num_cue) < eval_batch_size:
    raise ValueError(f"config.path.bn_examples={bn_examples} (of {num_cue} cue examples) makes "
                     f"no full BatchNorm batch of eval_batch_size={eval_batch_size}.")


# The fields of a cue model's train config that the study's statements depend on.
CUE_MODEL_FIELDS = ("data.dataset", "data.cue", "data.cue_proportion", "data.num_train",
                    "data.seed", "model.")


def check_cue_model(cue_model: train.TrainedModel, workdir: str, train_config: Any) -> None:
  """Raises unless a given cue model was trained with `train_config`'s data and model.

  Compares dataset, cue kind and proportion, training set size, data seed
  (and the simple dataset of Dominoes), model name and attributes.
  """
  recorded = workdir_lib.flatten(cue_model.config)
  expected = workdir_lib.flatten(workdir_lib.config_to_dict(train_config))
  fields = CUE_MODEL_FIELDS + (("data.simple_dataset",) if expected["data.cue"] == "dominoes"
                               else ())
  keys = sorted(k for k in set(recorded) | set(expected)
                if any(k == f or (f.endswith(".") and k.startswith(f)) for f in fields))
  diff = [k for k in keys if recorded.get(k) != expected.get(k)]
  if diff:
    raise ValueError(
        f"config.cue_model_workdir={workdir!r} holds a model trained with "
        + ", ".join(f"{k}={recorded.get(k)!r}" for k in diff) + " but config.train has "
        + ", ".join(f"{k}={expected.get(k)!r}" for k in diff)
        + ". Set config.train to the cue model's recipe (e.g. --config.train."
        f"{diff[0]}={recorded.get(diff[0])!r}), or give a cue model trained with this one.")


def _evaluate(model, variables, view_batches) -> dict:
  return {v: {k: float(x) for k, x in r.items()} for v, r in jax.device_get(
      counterfactual.evaluate_views(model.apply, variables, view_batches)).items()}


def _start_params(method: str, seed: int, cue_model: train.TrainedModel, clean_split,
                  ft: Any) -> Any:
  """The cue model's params with the head that lp, lp_ft and dfr fit (others: unchanged)."""
  model, params = cue_model.model, cue_model.params
  if method not in ("lp", "lp_ft", "dfr"):
    return params
  examples = clean_split.examples(np.arange(len(clean_split)))
  images, labels = examples["image"], examples["label"]
  if method == "dfr":
    idx = finetune.balanced_subset(labels, model.num_classes, seed)
    images, labels = images[idx], labels[idx]
  feats = finetune.extract_features(model.apply, cue_model.variables, images)
  if method == "dfr":
    head = finetune.fit_dfr_head(feats, labels, model.num_classes, l2=ft.dfr.l2)
  else:
    head = finetune.fit_head(feats, labels, model.num_classes, epochs=ft.lp.num_epochs,
                             learning_rate=ft.lp.learning_rate, batch_size=ft.batch_size,
                             seed=seed)
  return finetune.with_head(params, head)


def _member_step(method: str, model, cue_params, ft: Any, tx, steps_per_epoch: int,
                 mesh) -> Callable:
  """(state, batch, root_key) -> (state, metrics): one seed's step of a loop method."""
  if method == "cbft":
    loss_fn = mesh_lib.replicate(finetune.CBFTLoss(
        model.apply, cue_params, model.num_classes, margin=ft.cbft.margin,
        invariance_weight=ft.cbft.invariance_weight,
        t_distribution=ft.cbft.t_distribution), mesh)
    return functools.partial(finetune.cbft_step, loss_fn=loss_fn, tx=tx,
                             warmup_steps=ft.cbft.warmup_epochs * steps_per_epoch)
  return functools.partial(train.train_step, loss_fn=train.ClassificationLoss(model.apply), tx=tx)


def _local_batch(method: str, clean_split, cue_split, batch_size: int, seed: int, step: int
                 ) -> dict[str, np.ndarray]:
  """This host's rows of one seed's batch at `step` (clean, and cue for CBFT)."""
  rows = mesh_lib.process_rows(batch_size)
  clean = pipeline.batch_at_step(clean_split, batch_size, seed=seed, step=step, rows=rows)
  if method != "cbft":
    return clean
  cue = pipeline.batch_at_step(cue_split, batch_size, seed=seed + 1000, step=step, rows=rows)
  return {"clean_image": clean["image"], "clean_label": clean["label"],
          "cue_image": cue["image"], "cue_label": cue["label"]}


def _step_key(seed: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), 1)


@flax.struct.dataclass
class SeedEnsemble:
  """Several seeds' train states stacked on a leading axis, advanced by one vmapped step."""

  step: jax.Array  # scalar: the loop's step (every member's step equals it)
  members: train.TrainState  # leaves [num_seeds, ...]


def run_method(method: str, seeds: list[int], cue_model: train.TrainedModel, clean_split,
               cue_split, view_batches, ft: Any, workdirs: list[str], mesh, *,
               ensemble: bool = False) -> list[dict]:
  """Fine-tunes the cue model with one method for each seed: [{'variables', 'views', ...}].

  Loop methods (naive, lp_ft's second half, cbft) run `train.train_loop`,
  checkpointed and resumable: one loop per seed in `workdirs[i]`, or with
  `ensemble` one loop over a `SeedEnsemble` (all seeds in one compiled,
  vmapped step) in `workdirs[0]`. Each seed draws the same batches and step
  keys either way.
  """
  model = cue_model.model
  start = time.perf_counter()
  params = [_start_params(method, seed, cue_model, clean_split, ft) for seed in seeds]
  batch_stats = [cue_model.batch_stats] * len(seeds)
  if method in LOOP_METHODS:
    steps_per_epoch, num_steps = train.steps_of(ft, len(clean_split))
    tx, schedule = train.make_optimizer(
        ft.optimizer, num_steps=num_steps, steps_per_epoch=steps_per_epoch,
        learning_rate=ft.naive.learning_rate if method == "naive" else None)
    member_step = _member_step(method, model, cue_model.params, ft, tx, steps_per_epoch, mesh)
    options = functools.partial(train.loop_options, ft, num_steps, steps_per_epoch)
    loop = functools.partial(train.train_loop, mesh=mesh, learning_rate_fn=schedule,
                             examples_per_step=ft.batch_size * (len(seeds) if ensemble else 1))

    def fresh(p):
      return train.TrainState(step=jnp.zeros((), jnp.int32), params=p,
                              batch_stats=cue_model.batch_stats, opt_state=tx.init(p))

    def local(seed, step):
      return _local_batch(method, clean_split, cue_split, ft.batch_size, seed, step)

    if ensemble:
      keys = mesh_lib.replicate(jnp.stack([_step_key(s) for s in seeds]), mesh)

      @functools.partial(jax.jit, donate_argnums=0)
      def step_fn(state, batch):
        members, metrics = jax.vmap(member_step)(state.members, batch, keys)
        return SeedEnsemble(step=state.step + 1, members=members), metrics

      def batch_fn(step):
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *[local(s, step) for s in seeds])
        return mesh_lib.shard_batch(stacked, mesh, batch_axis=1)

      def init_fn():
        members = jax.tree.map(lambda *xs: jnp.stack(xs), *[fresh(p) for p in params])
        return SeedEnsemble(step=jnp.zeros((), jnp.int32), members=members)

      state = loop(init_fn, step_fn, batch_fn, workdirs[0],
                   options(f"{method} seeds {list(seeds)}"))
      params = [jax.tree.map(lambda x, i=i: x[i], state.members.params)
                for i in range(len(seeds))]
      batch_stats = [jax.tree.map(lambda x, i=i: x[i], state.members.batch_stats)
                     for i in range(len(seeds))]
    else:
      for i, seed in enumerate(seeds):
        step_fn = functools.partial(member_step,
                                    root_key=mesh_lib.replicate(_step_key(seed), mesh))
        state = loop(functools.partial(fresh, params[i]), step_fn,
                     lambda step, seed=seed: mesh_lib.shard_batch(local(seed, step), mesh),
                     workdirs[i], options(f"{method} seed {seed}"))
        params[i], batch_stats[i] = state.params, state.batch_stats
  seconds = round((time.perf_counter() - start) / len(seeds), 1)
  outs = []
  for p, stats in zip(params, batch_stats):
    variables = {"params": p, "batch_stats": stats} if stats else {"params": p}
    outs.append({"variables": variables, "views": _evaluate(model, variables, view_batches),
                 "seconds": seconds})
  return outs


def _summary(values: list[float]) -> dict:
  return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}


def dry_run(config: Any) -> dict:
  """The reproduce task's dry run: the cue model's step, a naive and a CBFT step, timed.

  The estimate counts the cue model's steps (none with `cue_model_workdir`)
  and every loop method's steps for every seed (lp and dfr fit a head on
  cached features: seconds, left out).
  """
  mesh = mesh_lib.data_mesh()
  check_study_config(config, mesh.devices.size)
  model, state, batch, cue_timing = train.dry_run_train_step(config.train, mesh,
                                                             "cue model step")
  if config.cue_model_workdir:
    cue_timing.num_steps = 0
  ft = config.finetune
  steps_per_epoch, num_steps = train.steps_of(ft, ft.num_clean)
  tx, _ = train.make_optimizer(ft.optimizer, num_steps=num_steps,
                               steps_per_epoch=steps_per_epoch)
  key = mesh_lib.replicate(jax.random.key(0), mesh)
  ft_state = mesh_lib.replicate(jax.tree.map(jnp.copy, state.replace(  # steps donate state
      step=jnp.zeros_like(state.step), opt_state=tx.init(state.params))), mesh)
  timings = [cue_timing]
  naive_runs = sum(m in ("naive", "lp_ft") for m in ft.methods) * len(config.seeds)
  if naive_runs:
    step = functools.partial(_member_step("naive", model, state.params, ft, tx, steps_per_epoch,
                                          mesh), root_key=key)
    ft_state, timing, _ = dry_run_lib.time_on_zero_batches(
        "naive / lp_ft step", step, ft_state, config.train.data, mesh,
        global_batch=ft.batch_size, num_steps=naive_runs * num_steps)
    timings.append(timing)
  if "cbft" in ft.methods:
    step = functools.partial(_member_step("cbft", model, state.params, ft, tx, steps_per_epoch,
                                          mesh), root_key=key)
    _, timing, _ = dry_run_lib.time_on_zero_batches(
        "cbft step", step, ft_state, config.train.data, mesh, global_batch=ft.batch_size,
        num_steps=len(config.seeds) * num_steps,
        to_batch=lambda b: {"clean_image": b["image"], "clean_label": b["label"],
                            "cue_image": b["image"], "cue_label": b["label"]})
    timings.append(timing)
  data = config.train.data
  return dry_run_lib.report(
      f"reproduce: {config.train.model.name} on {data.dataset} ({data.cue}, "
      f"p={data.cue_proportion}), methods {list(ft.methods)} x seeds {list(config.seeds)}",
      mesh, {"cue model state": state, "batch": batch}, timings)


def reproduce(config: Any, workdir: str, *, overwrite: bool = False) -> dict:
  """The fine-tuning study: cue model, every method x seed, views table, path barriers.

  Everything that can fail cheaply (the config's ranges, the set sizes, a
  given cue model's presence, finiteness and recipe) is checked before the
  workdir is claimed.
  """
  if config.get("dry_run", False):
    return dry_run(config)
  mesh = mesh_lib.data_mesh()
  check_study_config(config, mesh.devices.size)
  given = None
  if config.cue_model_workdir:
    given = train.load_trained(config.cue_model_workdir)
    check_cue_model(given, config.cue_model_workdir, config.train)
  with train.claimed(config, workdir, LAYOUT, overwrite) as config_dict:
    return _reproduce(config, workdir, mesh, config_dict, given, overwrite)


# The finetune subsections each method reads; the others do not change its numbers.
METHOD_SECTIONS = {"naive": ("naive",), "lp": ("lp",), "lp_ft": ("lp",), "dfr": ("dfr",),
                   "cbft": ("cbft",)}


def _run_config(config_dict: dict, cue_model: train.TrainedModel, method: str,
                seeds: list[int]) -> dict:
  """What determines one run's numbers, recorded in its directory: the study's config
  without its seed and method lists and the other methods' subsections, the method, the
  seed(s), and the cue model by its recorded config and step (not its path, which moves
  with the study's directory)."""
  study = {k: v for k, v in config_dict.items() if k not in ("seeds", "dry_run", "task")}
  others = {name for sections in METHOD_SECTIONS.values() for name in sections} - set(
      METHOD_SECTIONS[method])
  study["finetune"] = {k: v for k, v in study["finetune"].items()
                       if k != "methods" and k not in others}
  return {"task": "reproduce run", "method": method, "seeds": list(seeds),
          "cue_model": train.run_identity(cue_model), "study": study}


def _finished(run_dir: str, run_config: dict) -> dict | None:
  """The run's result when the directory holds one of exactly `run_config`, else None."""
  result_path = os.path.join(run_dir, RESULT_FILE)
  config_path = os.path.join(run_dir, workdir_lib.CONFIG_FILE)
  if not (os.path.exists(result_path) and os.path.exists(config_path)):
    return None
  with open(config_path) as f:
    recorded = json.load(f)
  if workdir_lib.config_differences(recorded, run_config):
    return None  # a run of another config: redone (its outputs are cleared when claimed)
  with open(result_path) as f:
    return json.load(f)


def _reproduce(config, workdir, mesh, config_dict, given, overwrite) -> dict:
  ensemble = seed_mode(config.seed_mode) == "vmap"
  wall = time.perf_counter()

  # 1. The cue model: a finished train run, or trained here (resumable).
  cue_dir = config.cue_model_workdir or os.path.join(workdir, "cue_model")
  if given is None:
    train.train_and_evaluate(config.train, cue_dir, overwrite=overwrite)
  cue_model = given or train.load_trained(cue_dir)

  # 2. Data: clean and cue sets from the cue model's training split; test views.
  split, test_views, test_labels = train.load_data(config.train.data)
  ft = config.finetune
  clean_split, cue_split = split_clean_and_cue(split, ft.num_clean, ft.num_cue, config.seed)
  view_batches = train.shard_views(test_views, test_labels, config.eval_batch_size, mesh)
  cue_eval = {"cue": view_batches["cue"]}
  bn_examples = cue_split.examples(np.arange(min(config.path.bn_examples, len(cue_split))))
  bn_batches = {"image": batching.stack_batches(bn_examples["image"], bn_examples["label"],
                                                config.eval_batch_size,
                                                drop_remainder=True)["image"]}
  ts = np.linspace(0.0, 1.0, config.path.num_t)

  # 3. Every method and seed. Each run directory records the config that produced it;
  #    a relaunch reuses a finished run of the same config; one of another config is
  #    refused (before any run starts) or, with --overwrite, cleared and redone.
  for method in ft.methods:
    for seed in config.seeds:
      workdir_lib.check_claim(os.path.join(workdir, "runs", f"{method}_seed{seed}"),
                              _run_config(config_dict, cue_model, method, [seed]), RUN_LAYOUT,
                              overwrite=overwrite)
  runs = {}
  primary = jax.process_index() == 0
  for method in ft.methods:
    todo = []
    for seed in config.seeds:
      run_dir = os.path.join(workdir, "runs", f"{method}_seed{seed}")
      done = _finished(run_dir, _run_config(config_dict, cue_model, method, [seed]))
      if done is None:
        todo.append(seed)
      else:
        runs[(method, seed)] = done
    if not todo:
      continue
    together = ensemble and method in LOOP_METHODS and len(todo) > 1
    result_dirs = [os.path.join(workdir, "runs", f"{method}_seed{seed}") for seed in todo]
    with contextlib.ExitStack() as claims:
      # A run directory of another config is refused, or with --overwrite cleared.
      for seed, d in zip(todo, result_dirs):
        claims.enter_context(train.claimed(
            _run_config(config_dict, cue_model, method, [seed]), d, RUN_LAYOUT, overwrite))
      run_dirs = result_dirs
      if together:
        run_dirs = [os.path.join(workdir, "runs", f"{method}_seeds{'-'.join(map(str, todo))}")]
        claims.enter_context(train.claimed(
            _run_config(config_dict, cue_model, method, todo), run_dirs[0], RUN_LAYOUT,
            overwrite))
      outs = run_method(method, todo, cue_model, clean_split, cue_split, view_batches, ft,
                        run_dirs, mesh, ensemble=together)
      for seed, out, result_dir in zip(todo, outs, result_dirs):
        path = jax.device_get(barriers.evaluate_path_sets(
            cue_model.model.apply, (cue_model.params, out["variables"]["params"]), ts,
            cue_eval, bn_batches=bn_batches, mesh=mesh)["cue"])
        record = {"method": method, "seed": seed, "views": out["views"],
                  "seconds": out["seconds"], "seeds_vmapped": together,
                  "path_to_cue_model": {
                      "sharded_over": path.sharded_over,
                      "loss": np.asarray(path.loss).tolist(),
                      "accuracy": np.asarray(path.accuracy).tolist(),
                      **{f"{k}_barrier": v for k, v in path.barriers().items()}}}
        if primary:
          workdir_lib.write_json_atomic(os.path.join(result_dir, RESULT_FILE), record)
        runs[(method, seed)] = record
        print(f"{method} seed {seed}: " + ", ".join(
            f"{v} {r['accuracy']:.3f}" for v, r in out["views"].items()) +
            f"; loss barrier to the cue model on cue data "
            f"{record['path_to_cue_model']['loss_barrier']:.3f}")

  # 4. Aggregate, write the JSON, the report and the figures.
  table = {}
  for method in ft.methods:
    recs = [runs[(method, s)] for s in config.seeds]
    table[method] = {
        "views": {v: _summary([r["views"][v]["accuracy"] for r in recs])
                  for v in recs[0]["views"]},
        "loss_barrier_to_cue_model": _summary(
            [r["path_to_cue_model"]["loss_barrier"] for r in recs]),
        "error_barrier_to_cue_model": _summary(
            [r["path_to_cue_model"]["error_barrier"] for r in recs]),
        "path_loss_mean": np.mean([r["path_to_cue_model"]["loss"] for r in recs], 0).tolist()}
  record = {
      "cue_model": {"workdir": os.path.abspath(cue_dir), "checkpoint": cue_model.checkpoint,
                    "views": _evaluate(cue_model.model, cue_model.variables, view_batches)},
      "methods": table,
      "seeds": list(config.seeds),
      "ts": ts.tolist(),
      # What the cue model was trained on, from its own run record (checked against
      # config.train before the study started), so the report states what ran.
      "data": {"dataset": cue_model.config["data"]["dataset"],
               "cue": cue_model.config["data"]["cue"],
               "cue_proportion_of_cue_model": cue_model.config["data"]["cue_proportion"],
               "num_clean": len(clean_split), "num_cue": len(cue_split),
               "num_test_per_view": int(len(test_labels)),
               "path_eval": "cue view of the test split",
               "path_batchnorm": f"{bn_batches['image'].shape[0] * bn_batches['image'].shape[1]}"
                                 " cue training examples"},
      "wall_seconds": round(time.perf_counter() - wall, 1),
      "backend": jax.default_backend(),
      "devices": int(mesh.devices.size),
      "config": config_dict,
  }
  if jax.process_index() == 0:
    workdir_lib.write_json_atomic(os.path.join(workdir, REPRODUCE_FILE), record)
    report.plot_finetune_views(record, os.path.join(workdir, "views.png"))
    report.plot_finetune_paths(record, os.path.join(workdir, "paths.png"))
    with open(os.path.join(workdir, REPORT_FILE), "w") as f:
      f.write(format_report(record))
  print(format_table(record))
  return record


def format_table(record: dict) -> str:
  """Markdown: method x view accuracy (mean +- std over seeds) and the path barrier."""
  views = list(record["cue_model"]["views"])
  lines = ["| method | " + " | ".join(views) + " | loss barrier to cue model (cue data) |",
           "|---" * (len(views) + 2) + "|"]
  lines.append("| cue model | " + " | ".join(
      f"{record['cue_model']['views'][v]['accuracy']:.3f}" for v in views) + " | - |")
  for method, row in record["methods"].items():
    cells = [f"{row['views'][v]['mean']:.3f} +- {row['views'][v]['std']:.3f}" for v in views]
    b = row["loss_barrier_to_cue_model"]
    lines.append(f"| {method} | " + " | ".join(cells) + f" | {b['mean']:.3f} +- {b['std']:.3f} |")
  return "\n".join(lines)


def format_report(record: dict) -> str:
  data = record["data"]
  return (f"# Fine-tuning study: {data['dataset']}, {data['cue']} cue on "
          f"{data['cue_proportion_of_cue_model']:.0%} of the cue model's training data\n\n"
          f"Test accuracy per view (mean +- std over seeds {record['seeds']}); the last column "
          f"is the loss barrier of the linear path from the cue model to the fine-tuned model, "
          f"on the cue view ({data['path_batchnorm']} for BatchNorm at each t).\n\n"
          f"{format_table(record)}\n\n"
          f"Fine-tuned on {data['num_clean']} clean examples (CBFT also on {data['num_cue']} "
          f"cue examples, disjoint); {data['num_test_per_view']} test examples per view. "
          f"Wall time {record['wall_seconds']:.0f} s on {record['backend']} "
          f"({record['devices']} device(s)).\n\n"
          "![view accuracies](views.png)\n\n![paths from the cue model](paths.png)\n")


def finetune_task(config: Any, workdir: str, *, overwrite: bool = False) -> dict:
  """One method and seed from a finished train run; writes result.json.

  The data is the cue model's own (its recorded data config).
  """
  mesh = mesh_lib.data_mesh()
  check_finetune_config(config, mesh.devices.size)
  checks.check_choice(config.method, finetune.METHODS, "method")
  if not config.cue_model_workdir:
    raise ValueError("config.cue_model_workdir is empty: give the workdir of a finished train "
                     "run.")
  cue_model = train.load_trained(config.cue_model_workdir)
  data_config = _AttrDict(cue_model.config["data"])
  check_set_sizes(config.finetune, dry_run_lib.num_train_examples(data_config),
                  (config.method,))
  with train.claimed(config, workdir, FINETUNE_LAYOUT, overwrite,
                     inputs={"cue_model": train.run_identity(cue_model)}) as config_dict:
    split, test_views, test_labels = train.load_data(data_config)
    ft = config.finetune
    clean_split, cue_split = split_clean_and_cue(split, ft.num_clean, ft.num_cue, config.seed)
    view_batches = train.shard_views(test_views, test_labels, config.eval_batch_size, mesh)
    (out,) = run_method(config.method, [config.seed], cue_model, clean_split, cue_split,
                        view_batches, ft, [workdir], mesh)
    record = {"method": config.method, "seed": config.seed, "views": out["views"],
              "cue_model": cue_model.checkpoint, "cue_model_data": cue_model.config["data"],
              "num_clean": len(clean_split), "num_cue": len(cue_split),
              "seconds": out["seconds"], "config": config_dict}
    if jax.process_index() == 0:
      workdir_lib.write_json_atomic(os.path.join(workdir, RESULT_FILE), record)
    print(counterfactual.format_view_table(out["views"],
                                           f"{config.method}, seed {config.seed}:"))
    return record


class _AttrDict(dict):
  """A dict read by attribute (a train run's recorded data config)."""

  def __getattr__(self, name):
    return self[name]

