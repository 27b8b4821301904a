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

Paper presets (CIFAR via TFDS, prepared offline: see README), named
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

PAPER_PERCENTS = (0, 60, 70, 80, 90, 100)
PAPER_DATASETS = ("cifar10", "cifar100")
PAPER_MODELS = ("vgg13", "resnet18")
CPU_PRESETS = ("cpu_cue", "cpu_nocue")
MODIFIERS = ("quicktest",)


def paper_presets() -> list[str]:
  """Every paper preset name."""
  names = [f"{d}_box{p}_{m}" for d in PAPER_DATASETS for p in PAPER_PERCENTS for m in PAPER_MODELS]
  names += [f"cifar10_dominoes{p}_{m}" for p in PAPER_PERCENTS for m in PAPER_MODELS]
  return names


def base_config() -> ml_collections.ConfigDict:
  """The CPU cue-model recipe; presets change fields of it."""
  config = ml_collections.ConfigDict()
  config.task = "train"  # driver: mechconn.train.train_and_evaluate
  config.seed = 0  # model init, data order and step randomness

  config.data = ml_collections.ConfigDict()
  config.data.dataset = "shapes10"  # base images: shapes10 (embedded), cifar10, cifar100, ...
  config.data.cue = "box"  # 'box' or 'dominoes' ('none': plain data; views are box views)
  config.data.cue_proportion = 0.8  # fraction of each class's training examples with the cue
  config.data.simple_dataset = "glyphs10"  # Dominoes' simple half (fashion_mnist for CIFAR)
  config.data.num_train = -1  # training examples; -1: the whole split
  config.data.num_test = 5000  # test examples per view; -1: the whole split
  config.data.seed = 0  # embedded data generation and the views' random draws
  config.data.data_dir = ""  # TFDS data dir; '': $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.data.download = False  # let TFDS download (needs the internet)

  config.model = ml_collections.ConfigDict()
  config.model.name = "small_cnn"  # mlp, small_cnn, vgg13, resnet18
  config.model.kwargs = ml_collections.ConfigDict({"width": 32})  # model attributes

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"  # SGD with momentum, weight decay added to the gradient
  config.optimizer.learning_rate = 0.05  # peak learning rate
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = "cosine"  # constant, cosine (to 0) or step
  config.optimizer.decay_every_epochs = 0  # 'step': multiply by decay_factor this often
  config.optimizer.decay_factor = 0.1  # 'step' only

  config.num_epochs = 3
  config.batch_size = 128  # global; divisible by the device count (<= 128 per CPU device)
  config.per_device_batch_size = 0  # > 0: batch_size = this x the job's device count
  config.eval_batch_size = 512  # global, for the views
  config.log_every_steps = 50  # a metrics line (and progress bar update) this often
  config.eval_every_steps = 390  # evaluate the four views this often; 0: only at the end
  config.checkpoint_every_steps = 200  # and at the end
  config.max_to_keep = 2  # newest checkpoints kept
  config.progress = True  # tqdm progress bar
  # Build everything, run one step, print the mesh, placement, per-device batch and
  # an estimate of the run's time; read no data, write nothing (mechconn.dry_run).
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
  config.model.kwargs = ml_collections.ConfigDict({"width": 1.0})
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
  """Shrinks a recipe to seconds: tiny data and model, short periods, no progress bar."""
  config.data.num_train = 512
  config.data.num_test = 200
  if "model" in config:  # fit_curve and eval_path take the end points' model
    config.model.kwargs = ml_collections.ConfigDict(
        {"width": 4 if config.model.name == "small_cnn" else 0.0625}
        if config.model.name != "mlp" else {"hidden": (16,)})
  config.num_epochs = 2
  config.batch_size = 32
  config.eval_batch_size = 80  # divisible by 8 and 16 (fake-device tests)
  config.log_every_steps = 4
  config.eval_every_steps = 16
  config.checkpoint_every_steps = 8
  config.progress = False


def apply_modifiers(config: ml_collections.ConfigDict, modifiers: list[str]) -> None:
  for modifier in modifiers:
    if modifier == "quicktest":
      apply_quicktest(config)
    else:
      raise ValueError(f"Unknown preset modifier {modifier!r}; valid modifiers: "
                       f"{list(MODIFIERS)}.")


def unlocked_config(name: str) -> ml_collections.ConfigDict:
  """The unlocked config of a preset name (no modifiers)."""
  config = base_config()
  if name == "cpu_nocue":
    config.data.cue_proportion = 0.0
  elif name in paper_presets():
    _apply_paper(config, name)
  elif name != "cpu_cue":
    raise ValueError(f"Unknown preset {name!r}; valid presets: {list(CPU_PRESETS)} and "
                     f"{{cifar10,cifar100}}_box{{{','.join(map(str, PAPER_PERCENTS))}}}_"
                     f"{{vgg13,resnet18}}, cifar10_dominoes{{...}}_{{vgg13,resnet18}}.")
  if config.data.cue_proportion == 0.0:
    # No-cue models start from another init than the cue models (seed 0), so
    # the pair is independently trained and alignment has units to match.
    config.seed = 1
  return config


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """The locked config of `preset[,modifier...]` (None: 'cpu_cue')."""
  name, *modifiers = (preset or "cpu_cue").split(",")
  config = unlocked_config(name)
  apply_modifiers(config, modifiers)
  config.lock()
  return config
