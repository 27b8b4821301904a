r"""Train one endpoint model (a cue model or a no-cue model) and evaluate it on the four views.

CPU presets, on the embedded shapes10 data (no download), SmallCNN(32), 3 epochs:

  python -m experiments.main --config=experiments/configs/train.py:cpu_cue \
      --workdir=workdir/cpu_cue        # box cue on 80% of each class
  python -m experiments.main --config=experiments/configs/train.py:cpu_nocue \
      --workdir=workdir/cpu_nocue      # no cue (p = 0), evaluated on the same views

Expected on the 2-core CPU (jax 0.10): about 3.5 minutes each; test accuracy
per view (clean / cue / rand_cue / rand_img), measured:
  cpu_cue    0.684 / 0.993 / 0.433 / 0.544   (the cue model: cue >> clean, rand_img >> 0.1)
  cpu_nocue  0.822 / 0.815 / 0.810 / 0.102   (the no-cue model, seed 1: rand_img at chance)

Language-model presets, on the embedded associative-recall sequences (no
download; mechconn.data.sequences): a causal transformer (causal_lm: width 32,
2 blocks of 2 heads, MLP ratio 2), the masked next-token loss, AdamW (no weight
decay) at 3e-3 with a 100-step linear warm-up and a cosine to 0, batch 64, one
epoch of 96,000 sequences (1,500 steps):

  python -m experiments.main --config=experiments/configs/train.py:recall_lm \
      --workdir=workdir/recall_lm        # seed 0 (init and batch order)
  python -m experiments.main --config=experiments/configs/train.py:recall_lm_seed1 \
      --workdir=workdir/recall_lm_seed1  # seed 1: the other end point of eval_path.py:recall_lm

Expected on the 2-core CPU (jax 0.10), measured: 18-22 s each (the loop 16-19
s); on the 4,096 held-out sequences, both seeds: next-token loss 0.0007,
accuracy 1.000 over the masked targets (the answers and the final EOS; the
answers alone: also 1.000). Chance on an answer is 1/8.

Paper presets (CIFAR via TFDS, prepared offline: docs/data.md), named
`{dataset}_{cue}{percent}_{model}`: dataset cifar10 or cifar100, cue box with
percent in 60, 70, 80, 90, 100 or 0 (the no-cue model), dominoes (CIFAR-10 over
Fashion-MNIST) with the same percents, model vgg13 or resnet18. All use the
paper's recipe: SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 256, 100
epochs, lr x0.1 every 40 epochs, no augmentation. E.g.

  python -m experiments.main --config=experiments/configs/train.py:cifar10_box80_vgg13 \
      --workdir=workdir/c10_box80_vgg13

(about 1 to 2 GPU-hours on one modern GPU, unmeasured here: this machine has
no GPU and no CIFAR copy.) The paper reports, for such cue models, cue
accuracy near 100% and clean accuracy well below a no-cue model's.

Modifiers follow the preset after commas: `train.py:cpu_cue,quicktest` shrinks
any recipe to run in seconds (tiny data and model), as the tests do.
A killed run resumes from its latest checkpoint when launched again with the
same config and workdir; a different config in the same workdir is refused
(pass --overwrite to replace that run).
"""

import ml_collections

from experiments.configs import common

PAPER_PERCENTS = (0, 60, 70, 80, 90, 100)
PAPER_DATASETS = ("cifar10", "cifar100")
PAPER_MODELS = ("vgg13", "resnet18")
CPU_PRESETS = ("cpu_cue", "cpu_nocue")
# A causal transformer LM on the embedded associative-recall sequences, two seeds: the end
# points of eval_path.py:recall_lm.
LM_PRESETS = ("recall_lm", "recall_lm_seed1")
# The paper's recipe (full-width model, 100-epoch cue model, box cue on 80%) on the
# embedded shapes10 (50,000 images of CIFAR's shape): paper-scale accelerator time where
# CIFAR is not reachable.
EMBEDDED_PAPER_PRESETS = tuple(f"shapes10_paper_{m}" for m in PAPER_MODELS)
MODIFIERS = {"quicktest": common.QUICKTEST}  # modifiers and what each does


def paper_presets() -> list[str]:
  """Every paper preset name."""
  names = [f"{d}_box{p}_{m}" for d in PAPER_DATASETS for p in PAPER_PERCENTS for m in PAPER_MODELS]
  names += [f"cifar10_dominoes{p}_{m}" for p in PAPER_PERCENTS for m in PAPER_MODELS]
  return names


_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "vgg13": "VGG-13",
           "resnet18": "ResNet-18"}


def describe_paper(preset: str) -> str:
  """'cifar10_box80_vgg13' -> 'CIFAR-10, box cue on 80% of each class, VGG-13'."""
  dataset, cue, percent, model = parse_paper_preset(preset)
  data = (f"Dominoes (Fashion-MNIST above {_PRETTY[dataset]})" if cue == "dominoes"
          else f"{_PRETTY[dataset]}")
  share = "no cue (p = 0: the no-cue model)" if percent == 0 else (
      f"{'box cue' if cue == 'box' else 'cue'} on {percent}% of each class")
  return f"{data}, {share}, {_PRETTY[model]}"


def presets() -> dict[str, str]:
  """Every preset and what it trains, in one line; the first is the default (None)."""
  lines = {
      "cpu_cue": "the cue model: shapes10 (embedded), box cue on 80% of each class, "
                 "SmallCNN(32), 3 epochs (about 3.5 min on a 2-core CPU)",
      "cpu_nocue": "the no-cue model: as cpu_cue without the cue (p = 0), seed 1",
      "recall_lm": "a causal transformer LM on the embedded associative-recall sequences, "
                   "seed 0 (about 20 s on a 2-core CPU)",
      "recall_lm_seed1": "as recall_lm with seed 1: eval_path.py:recall_lm's other end point"}
  for name in EMBEDDED_PAPER_PRESETS:
    model = _PRETTY[name.rpartition("_")[2]]
    lines[name] = (f"shapes10 (embedded, 50,000 images of CIFAR's shape), box cue on 80% of "
                   f"each class, {model}, the paper's recipe: paper-scale time without CIFAR")
  lines.update({name: f"{describe_paper(name)}, the paper's recipe" for name in paper_presets()})
  return lines



def base_config() -> ml_collections.ConfigDict:
  """The CPU cue-model recipe; presets change fields of it."""
  config = ml_collections.ConfigDict()
  config.task = "train"  # runs mechconn.tasks.train
  config.seed = 0  # model init, data order and step randomness
  config.data = common.data_section()
  config.model = common.model_section("small_cnn", width=32)
  config.optimizer = common.optimizer_section(0.05)
  common.add_loop_fields(
      config, num_epochs=3, batch_size=128, eval_batch_size=512,
      log_every_steps=50, eval_every_steps=390, checkpoint_every_steps=200, max_to_keep=2)
  # Build everything, run one step, print the mesh, placement, per-device batch and
  # an estimate of the run's time; read no data, write nothing (mechconn.tasks.train.dry_run).
  config.dry_run = False
  return config


def lm_config(seed: int) -> ml_collections.ConfigDict:
  """The language model's recipe (`LM_PRESETS`); `seed` sets its init and batch order."""
  config = ml_collections.ConfigDict()
  config.task = "train"  # runs mechconn.tasks.train
  config.seed = seed  # model init, data order and step randomness
  config.data = common.sequence_data_section()
  config.model = common.model_section("causal_lm", width=32, depth=2, num_heads=2, mlp_ratio=2)
  config.optimizer = common.optimizer_section(3e-3, weight_decay=0.0, schedule="warmup_cosine",
                                              name="adamw", warmup_steps=100)
  common.add_loop_fields(
      config, num_epochs=1, batch_size=64, eval_batch_size=512,
      log_every_steps=100, eval_every_steps=500, checkpoint_every_steps=500, max_to_keep=2)
  # Build everything, run one step, estimate the run; read no data, write nothing.
  config.dry_run = False
  return config


def parse_paper_preset(preset: str) -> tuple[str, str, int, str]:
  """'cifar10_box80_vgg13' -> ('cifar10', 'box', 80, 'vgg13')."""
  if preset not in paper_presets():
    raise ValueError(f"Unknown paper preset {preset!r}; valid: {paper_presets()}.")
  dataset, cue_part, model = preset.split("_")
  cue = "dominoes" if cue_part.startswith("dominoes") else "box"
  return dataset, cue, int(cue_part[len(cue):]), model


def _apply_paper(config: ml_collections.ConfigDict, preset: str) -> None:
  dataset, cue, percent, model = parse_paper_preset(preset)
  config.data.dataset = dataset
  config.data.cue = cue
  config.data.cue_proportion = percent / 100
  config.data.simple_dataset = "fashion_mnist"
  config.data.num_test = -1
  config.model.name = model
  # PyTorch's default initialisation, as the official models get it (models.layers).
  config.model.kwargs = ml_collections.ConfigDict({"width": 1.0, "weight_init": "torch"})
  config.optimizer.learning_rate = 0.1
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "step"
  config.optimizer.decay_every_epochs = 40
  config.num_epochs = 100
  config.batch_size = 256
  config.eval_batch_size = 1024
  config.log_every_steps = 100
  config.eval_every_steps = 1955  # about every 10 epochs of CIFAR's 50,000 at batch 256
  config.checkpoint_every_steps = 1000


def apply_quicktest(config: ml_collections.ConfigDict) -> None:
  """Shrinks a recipe to seconds: tiny data and model, short periods, no progress bar.

  Sets only the loop fields the recipe has (fit_curve's evaluates nothing).
  """
  config.data.num_train = 512
  config.data.num_test = 200
  if "model" in config:  # fit_curve and eval_path take the end points' model
    config.model.kwargs = ml_collections.ConfigDict(_quick_model_kwargs(config.model))
  if config.optimizer.warmup_steps:  # the language model's: within its 32 steps
    config.optimizer.warmup_steps = 4
  quick = {"num_epochs": 2, "batch_size": 32,
           "eval_batch_size": 80,  # divisible by 8 and 16 (fake-device tests)
           "log_every_steps": 4, "eval_every_steps": 16, "checkpoint_every_steps": 8,
           "progress": False}
  for key, value in quick.items():
    if key in config:
      config[key] = value


def _quick_model_kwargs(model: ml_collections.ConfigDict) -> dict:
  """A tiny model of the same kind; other attributes (weight_init, num_heads) stay."""
  if model.name == "mlp":
    return {"hidden": (16,)}
  if model.name == "causal_lm":
    return {**model.kwargs.to_dict(), "width": 8, "depth": 1}
  return {**model.kwargs.to_dict(), "width": 4 if model.name == "small_cnn" else 0.0625}


def apply_modifiers(config: ml_collections.ConfigDict, modifiers: list[str]) -> None:
  """Applies `modifiers` (of MODIFIERS; another raises) to a recipe."""
  if "quicktest" in common.check_modifiers(modifiers, MODIFIERS):
    apply_quicktest(config)


def unlocked_config(name: str) -> ml_collections.ConfigDict:
  """The unlocked config of a preset name (no modifiers)."""
  if name in LM_PRESETS:
    return lm_config(seed=LM_PRESETS.index(name))
  config = base_config()
  if name == "cpu_nocue":
    config.data.cue_proportion = 0.0
  elif name in paper_presets():
    _apply_paper(config, name)
  elif name in EMBEDDED_PAPER_PRESETS:
    _apply_paper(config, f"cifar10_box80_{name.rpartition('_')[2]}")
    config.data.dataset, config.data.simple_dataset = "shapes10", "glyphs10"
  elif name != "cpu_cue":
    raise ValueError(f"Unknown preset {name!r}; valid presets: {list(CPU_PRESETS)}, "
                     f"{list(LM_PRESETS)} and "
                     f"{{cifar10,cifar100}}_box{{{','.join(map(str, PAPER_PERCENTS))}}}_"
                     f"{{vgg13,resnet18}}, cifar10_dominoes{{...}}_{{vgg13,resnet18}}, "
                     f"{list(EMBEDDED_PAPER_PRESETS)}.")
  if config.data.cue_proportion == 0.0:
    # No-cue models start from another init than the cue models (seed 0), so
    # the pair is independently trained and alignment has units to match.
    config.seed = 1
  return config


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """The locked config of `preset[,modifier...]` (None: 'cpu_cue')."""
  name, modifiers = common.parse_preset(preset, "cpu_cue", MODIFIERS)
  config = unlocked_config(name)
  apply_modifiers(config, modifiers)
  config.lock()
  return config
