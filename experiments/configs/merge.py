r"""Merge N independently trained models into one, with and without aligning their units.

CPU preset, on the embedded shapes10 data (no download): trains 8 no-cue
SmallCNN(8) end points (train.py's cpu_nocue recipe at width 8, learning rate 0.2, 2
epochs; seeds 0-7) into workdir/merge_cpu/endpoints/seed_<s>, then merges the first
2, 3, 5 and 8 of them by plain averaging (none), MergeMany and synchronized
weight matching, and measures each merged model (BatchNorm recomputed) on the
four views; for all 8 also the simplex they span (its vertices, edges'
midpoints, centroid and 16 Dirichlet draws) and every pair's linear path:

  python -m experiments.main --config=experiments/configs/merge.py:cpu \
      --workdir=workdir/merge_cpu
  python -m experiments.main --config=experiments/configs/merge.py:cpu_activation \
      --workdir=workdir/merge_cpu_activation   # the same end points, activation matching

`cpu_activation` reads (or, when they are missing, trains) its end points in
workdir/merge_cpu/endpoints, where `cpu` trains them: one recipe, one set of
runs. `workdirs` merges given finished train runs
(`--config.endpoints.workdirs=a,b,c`; by default the cpu preset's eight).

Writes merge.json (every number and what produced it), merge.png (merged
accuracy per view vs n, one line per method; the pairwise error-barrier matrix
of the best method on the clean view) and prints the table. Expected on the
2-core CPU (jax 0.10), measured: cpu 27 minutes (training the 8 end points 17,
each 0.77-0.85 clean; the merges 8-11), a relaunch or cpu_activation on the
trained end points 7-8 minutes. Clean accuracy of the merged model at n = 2 / 3
/ 5 / 8 (the end points' mean: 0.809; the tables: docs/tasks.md, "Merging many
models"):
  none (plain average)        0.164 / 0.159 / 0.139 / 0.131
  merge_many, weight          0.507 / 0.518 / 0.647 / 0.491
  synchronized, weight        0.507 / 0.468 / 0.507 / 0.506
  merge_many, activation      0.608 / 0.491 / 0.511 / 0.450
  synchronized, activation    0.608 / 0.539 / 0.414 / 0.394
Independent pairwise matchings: cycle error 0.72 (weight), 0.70 (activation);
both multi-way methods 0.
`,quicktest` shrinks any preset to seconds (3 tiny end points, n in 2, 3).
"""

import ml_collections

from experiments.configs import common
from experiments.configs import train as train_config

MODIFIERS = train_config.MODIFIERS  # modifiers and what each does
CPU_SEEDS = tuple(range(8))  # the cpu preset's end points
CPU_ENDPOINTS = "workdir/merge_cpu/endpoints"  # where `cpu` trains them (its workdir's endpoints)


def presets() -> dict[str, str]:
  """Every preset and what it runs, in one line; the first is the default (None)."""
  return {"cpu": "8 no-cue SmallCNN(8) end points trained here, merged by averaging, MergeMany "
                 "and synchronized weight matching at n = 2, 3, 5, 8; simplex and pairwise "
                 "barriers of all 8",
          "cpu_activation": "as cpu with activation matching, on the cpu preset's end points "
                            f"({CPU_ENDPOINTS}; trained there if missing)",
          "workdirs": "given finished train runs (--config.endpoints.workdirs=a,b,...; by "
                      "default the cpu preset's eight), merged as cpu"}


def endpoint_recipe(quick: bool) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(train.py's cpu_nocue recipe at SmallCNN(8), lr 0.2, 2 epochs, without its seed and
  data; that data); `quick`: shrunk by train.py's quicktest."""
  recipe = train_config.unlocked_config("cpu_nocue")
  recipe.model.kwargs.width = 8  # SmallCNN(8): 8 end points train in minutes on a CPU
  recipe.num_epochs = 2  # passes over the 50,000 training images per end point
  recipe.optimizer.learning_rate = 0.2  # peak learning rate (width 8 learns slowly at 0.05)
  recipe.eval_every_steps = 0  # each end point evaluated on the views only at its end
  recipe.data.num_test = 2000  # test examples per view (train's own evaluation and the merge's)
  if quick:
    train_config.apply_quicktest(recipe)
  data = recipe.data
  del recipe.seed, recipe.data  # each end point's: endpoints.seeds, and config.data
  return recipe, data


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """The locked config of `preset[,modifier...]` (None: 'cpu')."""
  name, modifiers = common.parse_preset(preset, "cpu", MODIFIERS)
  if name not in presets():
    raise ValueError(f"Unknown preset {name!r}; valid presets: {list(presets())}.")
  quick = "quicktest" in modifiers
  recipe, data = endpoint_recipe(quick)
  config = ml_collections.ConfigDict()
  config.task = "merge"  # runs mechconn.tasks.merge
  # MergeMany's order of models, weight matching's of groups, the simplex's Dirichlet draws
  config.seed = 0
  # The end points' data (every end point is trained on it, or was: checked) and its test
  # views, on which every model is evaluated.
  config.data = data
  config.endpoints = ml_collections.ConfigDict()
  # The end points' train recipe without its seed and data (end point i: this recipe with
  # endpoints.seeds[i] on config.data). With endpoints.workdirs only its model is read: the
  # dry run's stand-in before the runs exist.
  config.endpoints.train = recipe
  # One end point trained per seed, in this order; () with endpoints.workdirs.
  config.endpoints.seeds = CPU_SEEDS[:3] if quick else CPU_SEEDS
  # Finished train (or finetune) runs as the end points, in order; (): train endpoints.seeds.
  config.endpoints.workdirs = ()
  # Where the trained end points go, a run seed_<s> each ('': <workdir>/endpoints); a finished
  # run of the same recipe there is reused, not retrained.
  config.endpoints.directory = ""
  config.sizes = (2, 3) if quick else (2, 3, 5, 8)  # merge the first n end points, each n
  config.align = ml_collections.ConfigDict()
  # none (plain averaging), merge_many and synchronized (mechconn.multi_align.METHODS): every
  # model's units matched into the first model's frame before averaging.
  config.align.methods = ("none", "merge_many", "synchronized")
  config.align.matching = "weight"  # weight (Git Re-Basin's objective) or activation matching
  # Activation matching correlates post_relu (every site's ReLU, as eval_path) or
  # module_outputs (before it), on the BatchNorm examples.
  config.align.activation_sites = "post_relu"
  config.align.max_sweeps = 100  # MergeMany's bound on sweeps over the models
  config.simplex = ml_collections.ConfigDict()
  # Dirichlet draws in the simplex of all N end points (besides vertices, edges' midpoints
  # and centroid).
  config.simplex.num_samples = 2 if quick else 16
  config.simplex.concentration = 1.0  # the Dirichlet's concentration (1: uniform on the simplex)
  # Every pair's linear path (num_t points) and the BatchNorm statistics of every evaluated
  # model.
  config.path = common.path_section(num_t=3 if quick else 5, bn_examples=160 if quick else 1024)
  config.path.bn_data = "clean"  # BatchNorm statistics from clean (or 'train') training images
  config.eval_batch_size = 80 if quick else 128  # global, for the views and BatchNorm
  # Build, time one evaluated point (and a training step), estimate; no data, no files.
  config.dry_run = False
  if name == "cpu_activation":
    config.align.matching = "activation"
    # The cpu preset's end points (one recipe); quicktest's tiny ones in its own workdir.
    config.endpoints.directory = "" if quick else CPU_ENDPOINTS
  elif name == "workdirs":
    config.endpoints.workdirs = tuple(f"{CPU_ENDPOINTS}/seed_{s}"
                                      for s in config.endpoints.seeds)
    config.endpoints.seeds = ()
  if quick:
    config.data.num_test = 100
  config.lock()
  return config
