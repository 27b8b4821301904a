"""What the config files share: the preset parser and the sections several tasks use.

One vocabulary in every task: `data`, `model` (or `endpoint_model`), `optimizer`,
the loop fields (`num_epochs`, `batch_size`, ...), `path.num_t`, `path.bn_examples`,
`finetune`. A builder sets every field of its section; a task adds only what it reads.
"""

from collections.abc import Collection

import ml_collections

FINETUNE_METHODS = ("naive", "lp", "lp_ft", "dfr", "cbft")  # the study's default methods
# Methods a config may name: these and the `scratch` baseline (mechconn.finetune.METHODS).
ALL_METHODS = FINETUNE_METHODS + ("scratch",)
# The `quicktest` modifier's line in the catalogue (every config file has it).
QUICKTEST = "shrinks the run to seconds (tiny data and model, short loops): smoke tests"


def check_modifiers(modifiers: list[str], valid: Collection[str]) -> list[str]:
  """`modifiers` without repeats, in order; one not in `valid` (a config file's MODIFIERS:
  names, or names -> descriptions) raises ValueError."""
  for modifier in modifiers:
    if modifier not in valid:
      raise ValueError(f"Unknown preset modifier {modifier!r}; valid modifiers: {list(valid)}.")
  return list(dict.fromkeys(modifiers))


def parse_preset(preset: str | None, default: str,
                 modifiers: Collection[str]) -> tuple[str, list[str]]:
  """'name,mod1,mod2' -> ('name', ['mod1', 'mod2']); None or '' -> (default, []).

  `modifiers` are the valid ones; an unknown one raises ValueError. A repeated
  modifier is allowed and counts once. The caller checks the name.
  """
  name, *given = (preset or default).split(",")
  return name, check_modifiers(given, modifiers)


def data_section() -> ml_collections.ConfigDict:
  """The cue-data recipe of the CPU cue model (train, fit_curve, eval_path, reproduce)."""
  data = ml_collections.ConfigDict()
  data.dataset = "shapes10"  # base images: shapes10 (embedded), cifar10, cifar100, ...
  data.cue = "box"  # 'box' or 'dominoes' ('none': plain data; views are box views)
  data.cue_proportion = 0.8  # fraction of each class's training examples with the cue
  # Fraction of each class's test examples the cue, rand_cue and rand_img views treat (the
  # rest stay clean; rand_img still swaps their image). 1: the paper's published Table 1;
  # the official fine-tuning script passes its --cue_proportion here (e.g. 0.8).
  data.test_cue_proportion = 1.0
  data.simple_dataset = "glyphs10"  # Dominoes' simple half (fashion_mnist for CIFAR)
  data.num_train = -1  # training examples; -1: the whole split
  data.num_test = 5000  # test examples per view; -1: the whole split
  data.seed = 0  # embedded data generation and the views' random draws
  data.data_dir = ""  # TFDS data dir; '': $TFDS_DATA_DIR or ~/tensorflow_datasets
  data.download = False  # let TFDS download (needs the internet)
  # Where training batches are drawn: device (the split on the accelerator; only indices
  # cross per step), host (numpy), or auto (device when the split fits in a quarter of a
  # device's memory). The same batches either way (mechconn.data.steps).
  data.pipeline = "auto"
  return data


def sequence_data_section() -> ml_collections.ConfigDict:
  """The language model's data: embedded associative-recall sequences (train, eval_path)."""
  data = ml_collections.ConfigDict()
  # Embedded sequences (mechconn.tasks.sequences.DATASETS): 'recall', multi-query
  # associative recall (mechconn.data.sequences), generated from the seed: no download.
  data.dataset = "recall"
  data.num_train = 96_000  # training sequences
  data.num_test = 4096  # held-out sequences (the eval set 'test')
  data.seed = 0  # generation: training sequences from 2 * seed, held-out from 2 * seed + 1
  data.pipeline = "auto"  # sequences are always drawn on the host ('auto' or 'host')
  return data


def model_section(name: str, **kwargs) -> ml_collections.ConfigDict:
  """A model by name and its attributes."""
  model = ml_collections.ConfigDict()
  # mlp, small_cnn, vgg13, resnet18 (mechconn.models.MODELS); causal_lm for sequence data
  model.name = name
  model.kwargs = ml_collections.ConfigDict(kwargs)  # the model's attributes (constructor arguments)
  # Compute dtype: float32, or bfloat16 (bfloat16 activations and weights in the compute;
  # float32 parameters, BatchNorm statistics, losses and accumulations).
  model.dtype = "float32"
  return model


def optimizer_section(learning_rate: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                      schedule: str = "cosine", decay_every_epochs: int = 0,
                      decay_factor: float = 0.1, name: str = "sgd",
                      warmup_steps: int = 0) -> ml_collections.ConfigDict:
  """SGD with momentum (or AdamW) and a learning-rate schedule."""
  optimizer = ml_collections.ConfigDict()
  # sgd (momentum, weight decay added to the gradient) or adamw (decoupled weight decay)
  optimizer.name = name
  optimizer.learning_rate = learning_rate  # peak learning rate
  optimizer.momentum = momentum  # SGD momentum; adamw's b1
  optimizer.weight_decay = weight_decay  # sgd: this x the parameters is added to the gradient
  # constant, cosine (to 0 over the run), step, or warmup_cosine (linear from 0 over
  # warmup_steps, then cosine to 0)
  optimizer.schedule = schedule
  optimizer.decay_every_epochs = decay_every_epochs  # 'step': multiply by decay_factor this often
  optimizer.decay_factor = decay_factor  # 'step': the factor (every decay_every_epochs)
  optimizer.warmup_steps = warmup_steps  # 'warmup_cosine': steps of the linear warm-up
  return optimizer


def add_loop_fields(config: ml_collections.ConfigDict, *, num_epochs: int, batch_size: int,
                    log_every_steps: int, checkpoint_every_steps: int, max_to_keep: int,
                    progress: bool = True, per_device_batch_size: int = 0,
                    eval_batch_size: int | None = None,
                    eval_every_steps: int | None = None) -> None:
  """Adds the fields of a resumable training loop to `config`.

  None: the task has no such field (eval_* where the loop evaluates nothing).
  """
  config.num_epochs = num_epochs  # passes over the training data
  config.batch_size = batch_size  # global; divisible by the device count (<= 128 per CPU device)
  config.per_device_batch_size = per_device_batch_size  # > 0: batch_size = this x the devices
  if eval_batch_size is not None:
    config.eval_batch_size = eval_batch_size  # global, for evaluation (and feature extraction)
  config.log_every_steps = log_every_steps  # a metrics line (and progress bar update) this often
  if eval_every_steps is not None:
    config.eval_every_steps = eval_every_steps  # evaluate this often; 0: only at the end
  config.checkpoint_every_steps = checkpoint_every_steps  # saved this often and at the end
  config.max_to_keep = max_to_keep  # newest checkpoints kept
  config.progress = progress  # tqdm progress bar


def path_section(num_t: int, bn_examples: int) -> ml_collections.ConfigDict:
  """Where a path between two models is evaluated, and its BatchNorm statistics."""
  path = ml_collections.ConfigDict()
  path.num_t = num_t  # points on the path, np.linspace(0, 1, num_t)
  path.bn_examples = bn_examples  # training examples for the BatchNorm statistics at each t
  # Variance averaged over the BatchNorm batches: biased (what training normalises by) or
  # unbiased (PyTorch's update_bn, for parity with PyTorch-computed numbers).
  path.bn_variance = "biased"
  return path


def diagnostics_section() -> ml_collections.ConfigDict:
  """Where and why a barrier forms (mechconn.diagnostics): what eval_path runs on every path."""
  diag = ml_collections.ConfigDict()
  # Which diagnostics to run on every path: any of layerwise (barriers when one parameter
  # group moves), features (feature connectivity and activation agreement), curvature
  # (top Hessian eigenvalue and trace) and calibration (the loss barrier after one fitted
  # softmax temperature per t); () runs none.
  diag.run = ()
  # Layer-wise groups: spec (each permuted layer with its BatchNorm, and the unpermuted head)
  # or modules (the model's top-level submodules).
  diag.groups = "spec"
  diag.num_t = 11  # points on each path for the diagnostics, np.linspace(0, 1, num_t)
  diag.num_examples = 500  # test examples per view the diagnostics read (the first ones)
  diag.curvature_examples = 256  # test examples (clean view) of the curvature's loss
  diag.num_eigenvalues = 1  # top Hessian eigenvalues per t (Lanczos)
  diag.num_matvecs = 20  # Lanczos steps (Hessian-vector products) per t
  diag.num_probes = 8  # Hutchinson probes of the Hessian trace per t; 0: no trace
  # Held-out clean examples the temperature at each t is fitted on (never the eval set): a
  # fresh draw of the embedded test split (another seed), or TFDS test examples after
  # data.num_test.
  diag.calibration_examples = 1000
  # The maximum of each view's loss and error barrier found adaptively (coarse grid, then
  # refinement; mechconn.diagnostics.adaptive), beside the grid's, certified to:
  diag.adaptive = False
  diag.adaptive_tolerance = 0.01  # within this of the maximum (if the curvature bound holds)
  return diag


def finetune_section(paper: bool) -> ml_collections.ConfigDict:
  """The fine-tuning recipe: the official defaults (`paper`) or the CPU one."""
  ft = ml_collections.ConfigDict()
  ft.methods = FINETUNE_METHODS  # which methods to run
  ft.num_clean = 2500  # clean fine-tuning examples (no cue)
  ft.num_cue = 47500 if paper else 20000  # cue examples for CBFT (all cued); -1: the rest
  ft.optimizer = optimizer_section(0.01, weight_decay=1e-4)  # LP-FT's second stage and CBFT
  add_loop_fields(ft, num_epochs=20 if paper else 10,  # epochs over the clean set
                  batch_size=256 if paper else 128, log_every_steps=10,
                  checkpoint_every_steps=100, max_to_keep=1)
  ft.naive = ml_collections.ConfigDict()
  # Naive FT's peak learning rate. The paper's Table 1 has two naive rows, lr 0.01 (the
  # official default) and 0.001; on the embedded data lr 0.01 moves the cue model further
  # off the cue than on CIFAR (rand_img 0.31 vs the paper's 0.64), so the CPU preset uses
  # 0.001 (rand_img 0.47, the paper: 0.91).
  ft.naive.learning_rate = 0.01 if paper else 0.001
  ft.scratch = ml_collections.ConfigDict()
  # The baseline trained from a fresh init on the clean set alone, for as many steps as the
  # fine-tuning methods, at the cue model's peak learning rate (CPU 0.05, paper 0.1).
  ft.scratch.learning_rate = 0.1 if paper else 0.05
  ft.lp = ml_collections.ConfigDict()
  ft.lp.learning_rate = 0.5  # SGD on cached features (the official code: lr 30, 200 epochs)
  ft.lp.num_epochs = 100  # epochs over the cached features
  ft.dfr = ml_collections.ConfigDict()
  ft.dfr.l2 = 0.01  # L2 weight of the logistic regression on standardised features
  ft.cbft = ml_collections.ConfigDict()
  ft.cbft.margin = 1.0  # m in |m - CE| of the barrier step
  ft.cbft.invariance_weight = 1.0  # lambda, the weight of the invariance loss
  ft.cbft.warmup_epochs = 1  # epochs without the invariance loss
  ft.cbft.t_distribution = "clip"  # clip (official code) or truncnorm (paper text)
  ft.cbft.barrier_loss = True  # False: the ablation without the barrier step
  # The learning-rate schedule advances per CBFT iteration (both updates at its rate, as the
  # official scheduler), or per optimiser update ('update': the schedule ends halfway); the
  # paper presets, as the official script, only from epoch warmup_epochs + 1 on.
  ft.cbft.schedule_per = "iteration_after_warmup" if paper else "iteration"
  # CBFT's cue examples: all_cued (every one carries the cue) or as_split (as the official
  # script: they keep the training split's cue flags, so about cue_proportion of them).
  ft.cbft.cue_set = "all_cued"
  return ft


def shrink_finetune(ft: ml_collections.ConfigDict) -> None:
  """The quicktest fine-tuning recipe: tiny sets, 2 epochs, no progress bar."""
  ft.num_clean, ft.num_cue = 100, 200
  ft.num_epochs, ft.batch_size = 2, 32
  ft.lp.num_epochs = 5
  ft.progress = False
