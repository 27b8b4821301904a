r"""Claim C13, the one-hidden-layer theory: networks relying on different attributes.

  python -m experiments.main --config=experiments/configs/theory.py \
      --workdir=workdir/claims/c13

Trains one-hidden-layer ReLU networks (`hidden` units) on synthetic data
(`mechconn.data.two_attributes`): `seeds` relying on a linear attribute and
`seeds` on a banded one, then evaluates the linear path of every same-attribute
and different-attribute pair before and after permutation alignment, with the
agreement of their ReLU activation patterns (`mechconn.tasks.theory`). About 5
seconds on the 2-core CPU. Presets: default; quicktest (about 2 seconds).
"""

import ml_collections

from experiments.configs import common

MODIFIERS = {"quicktest": common.QUICKTEST}  # modifiers and what each does


def presets() -> dict[str, str]:
  """Every preset and what it runs, in one line; the first is the default (None)."""
  return {"default": "3 one-hidden-layer ReLU networks (16 units) per attribute, 30 epochs, "
                     "paths before and after alignment (about 5 s on a 2-core CPU)",
          "quicktest": "2 networks per attribute, 12 epochs, 3 t (about 2 s)"}



def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """The locked config of `default[,quicktest]`."""
  name, modifiers = common.parse_preset(preset, "default", MODIFIERS)
  if name not in ("default", "quicktest"):
    raise ValueError(f"Unknown preset {name!r}; valid presets: ['default', 'quicktest'].")
  config = ml_collections.ConfigDict()
  config.task = "theory"  # runs mechconn.tasks.theory
  # Networks per attribute (init seeds 0..num_seeds-1, then num_seeds..2 num_seeds-1).
  config.num_seeds = 3
  config.data = ml_collections.ConfigDict()
  config.data.bands = 4  # bands of the complex attribute (labels alternate between bands)
  config.data.noise_dims = 8  # input dimensions carrying no label
  config.data.noise_scale = 0.5  # the standard deviation of those dimensions
  config.data.num_train = 8192  # per training set (one per attribute)
  config.data.num_test = 4096  # per test set (both / linear only / complex only)
  config.data.seed = 0  # draws every set
  config.hidden = 16  # units of the one hidden layer
  config.optimizer = common.optimizer_section(0.1, weight_decay=0.0)  # cosine to 0
  config.batch_size = 128  # training batch size
  config.num_epochs = 30  # training epochs per network
  config.eval_batch_size = 512  # global, for the paths' evaluation
  config.path = ml_collections.ConfigDict()
  config.path.num_t = 11  # points on each path, np.linspace(0, 1, num_t)
  if name == "quicktest" or "quicktest" in modifiers:
    config.data.num_test = 1024
    config.num_epochs, config.num_seeds, config.path.num_t = 12, 2, 3
  config.lock()
  return config
