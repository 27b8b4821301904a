"""Benchmark: the loss barrier after alignment versus network width (ResNet-20 style).

For each norm (BatchNorm, LayerNorm) and width multiplier it trains 2 x P
networks (seeds 2k and 2k + 1 form pair k) on embedded, no-download data (no
cue: `glyphs10` for the cpu preset, `shapes10` for gpu), aligns each pair's
second network to its first by weight matching (WM) and by activation
matching (AM, correlations of the ReLU'd site outputs) with the spec
`symmetry.derive_spec` derives, and evaluates the linear path between them
on held-out test images at `num_t` evenly spaced t. Columns:

  BatchNorm  none+reset, WM+reset, AM+reset: BatchNorm statistics recomputed
             exactly at every t (`renormalize='batchnorm'`), the REPAIR paper's
             "reset"; for a BatchNorm network this is REPAIR (reset is what
             REPAIR does to a network whose every conv feeds a BatchNorm).
  LayerNorm  none, WM, AM (plain interpolation, `renormalize=None`) and
             WM+REPAIR, AM+REPAIR (`renormalize='repair'`: REPAIR's
             statistics at every conv and dense output but the head).

Statistics per (norm, width, alignment), mean over pairs with a 95% Student-t
interval: `max_loss` and `max_error` (`PathEval.summary()`: the largest rise
of the test loss / error above the chord over the t grid) and `mid_loss`,
`mid_error` (the value at t = 0.5 minus the mean of the two ends; error in
accuracy points, as the REPAIR paper reports it). The end networks' test
accuracies are reported per (norm, width). JSON lines go to stdout; the JSON
record and the figure (barrier vs width, log2 axis, one panel per norm) to
--out. Trained networks are cached under --out/cache/<preset>-<hash>/ as
.npz of float arrays, so a rerun of the same preset only evaluates.

  python benchmarks/width_barriers.py --preset=cpu --figure_to=docs/width_barriers.png
  python benchmarks/width_barriers.py --preset=smoke   # a minute or two (its test)
  python benchmarks/width_barriers.py --preset=gpu     # paper scale, for an accelerator

Presets (PRESETS): cpu is ResNet-8-style (1 block per stage) at base width 4
(1x: 4/8/16 channels ... 8x: 32/64/128) on 16x16 glyphs10, 3000 training
images, 4 epochs of Adam, 3 pairs: 26 min on 2 shared CPU cores (train 947 s,
evaluation 601 s), end accuracies 30-38% at 1x, 100% (BatchNorm) and 56%
(LayerNorm) at 8x. gpu is ResNet-20 (3 blocks) at base width 16 on 32x32
shapes10, 50,000 images, 100 epochs of SGD, 5 pairs; it has not been run.
On the cpu preset weight matching's barriers stay near the unaligned ones,
where activation matching's fall: the networks are narrow (its 8x is ResNet-20
at 2x) and short-trained (docs/many_models.md, "Measured").
"""

import argparse
import dataclasses
import hashlib
import json
import os
import time

from flax import traverse_util
import jax
import numpy as np
import optax
from scipy import stats

from mechconn import align
from mechconn import barriers
from mechconn import counterfactual
from mechconn import loop
from mechconn import matching
from mechconn import step as step_lib
from mechconn import symmetry
from mechconn.data import batching, datasets
from mechconn.models import get_model

NORMS = ("batch", "layer")
ALIGNMENTS = {  # norm -> ((column, alignment, renormalize), ...)
    "batch": (("none+reset", "none", "batchnorm"), ("WM+reset", "weight", "batchnorm"),
              ("AM+reset", "activation", "batchnorm")),
    "layer": (("none", "none", None), ("WM", "weight", None), ("AM", "activation", None),
              ("WM+REPAIR", "weight", "repair"), ("AM+REPAIR", "activation", "repair")),
}
STATISTICS = ("max_loss", "max_error", "mid_loss", "mid_error")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "width_barriers")


@dataclasses.dataclass(frozen=True)
class Preset:
  """What is trained and evaluated (every field enters the cache key but `num_t`)."""

  dataset: str  # an embedded one: 'shapes10' (harder) or 'glyphs10' (simpler), no cue
  widths: tuple[int, ...]  # multipliers of base_channels x (1, 2, 4)
  base_channels: int  # first stage's channels at width 1 (ResNet-20: 16)
  blocks_per_stage: int  # 3: ResNet-20, 1: ResNet-8
  image_size: int  # shapes10 is 32x32; smaller sizes are 2x2 (4x4) mean-pooled
  num_train: int
  num_test: int
  num_stats: int  # training images for BatchNorm/REPAIR statistics and activation matching
  epochs: int
  batch_size: int
  optimizer: str  # 'sgd' (momentum 0.9, weight decay 5e-4) or 'adam'; cosine to 0
  learning_rate: float
  num_pairs: int  # pair k = seeds (2k, 2k + 1)
  num_t: int = 11  # odd, so that t = 0.5 is on the grid


PRESETS = {
    "smoke": Preset(dataset="glyphs10", widths=(1,), base_channels=2, blocks_per_stage=1,
                    image_size=8, num_train=256, num_test=128, num_stats=128, epochs=1,
                    batch_size=64, optimizer="adam", learning_rate=2e-3, num_pairs=2, num_t=3),
    "cpu": Preset(dataset="glyphs10", widths=(1, 2, 4, 8), base_channels=4, blocks_per_stage=1,
                  image_size=16, num_train=3000, num_test=1000, num_stats=500, epochs=4,
                  batch_size=128, optimizer="adam", learning_rate=2e-3, num_pairs=3),
    "gpu": Preset(dataset="shapes10", widths=(1, 2, 4, 8), base_channels=16,
                  blocks_per_stage=3, image_size=32, num_train=50_000, num_test=10_000,
                  num_stats=5000, epochs=100, batch_size=128, optimizer="sgd",
                  learning_rate=0.1, num_pairs=5),
}


def preset_named(name: str) -> Preset:
  """The preset of that name; a ValueError naming the valid ones otherwise."""
  if name not in PRESETS:
    raise ValueError(f"Unknown preset {name!r}; valid presets: {sorted(PRESETS)}.")
  preset = PRESETS[name]
  check_preset(preset)
  return preset


def check_preset(preset: Preset) -> None:
  """Raises ValueError for a preset that cannot give the statistics."""
  if not preset.widths or min(preset.widths) < 1:
    raise ValueError(f"Widths must be multipliers >= 1, got {preset.widths}.")
  if preset.num_pairs < 2:
    raise ValueError(f"A confidence interval needs >= 2 pairs, got {preset.num_pairs}.")
  if preset.num_t < 3 or preset.num_t % 2 == 0:
    raise ValueError(f"num_t must be odd and >= 3 (t = 0.5 on the grid), got {preset.num_t}.")
  if preset.dataset not in ("shapes10", "glyphs10"):
    raise ValueError(f"dataset must be an embedded one, 'shapes10' or 'glyphs10'; got "
                     f"{preset.dataset!r}.")
  if preset.optimizer not in ("sgd", "adam"):
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {preset.optimizer!r}.")
  if 32 % preset.image_size:
    raise ValueError(f"image_size must divide 32, got {preset.image_size}.")


# --- Statistics. ---------------------------------------------------------------------


def midpoint_barrier(ts: np.ndarray, values: np.ndarray) -> float:
  """v(0.5) - (v(0) + v(1)) / 2: the barrier at the midpoint, as the REPAIR paper's."""
  ts, values = np.asarray(ts), np.asarray(values)
  middle = np.flatnonzero(np.isclose(ts, 0.5))
  if middle.size != 1:
    raise ValueError(f"The t grid has no single t = 0.5: {ts.tolist()}.")
  return float(values[middle[0]] - 0.5 * (values[0] + values[-1]))


def mean_interval(values, confidence: float = 0.95) -> dict[str, float]:
  """{'mean', 'ci_low', 'ci_high'}: the mean and its Student-t interval (n - 1 dof)."""
  values = np.asarray(values, np.float64)
  if values.size < 2:
    raise ValueError(f"A t-interval needs at least 2 values, got {values.size}.")
  mean = float(values.mean())
  half = float(stats.t.ppf(0.5 + confidence / 2, values.size - 1)
               * values.std(ddof=1) / np.sqrt(values.size))
  return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half}


def path_statistics(path: barriers.PathEval) -> dict[str, float]:
  """The four barriers of one path: max over t and at the midpoint, loss and error (points)."""
  ts = np.asarray(path.ts)
  summary = path.summary()
  loss, error = np.asarray(path.loss), np.asarray(path.error)
  return {"max_loss": summary["loss"], "max_error": 100 * summary["error"],
          "mid_loss": midpoint_barrier(ts, loss), "mid_error": 100 * midpoint_barrier(ts, error)}


# --- Data, training and its cache. -----------------------------------------------------


def load_images(preset: Preset, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The preset's embedded dataset (no cue) in [-1, 1], mean-pooled to its image size."""
  n = preset.num_train if split == "train" else preset.num_test
  images, labels = datasets.load_base(preset.dataset, split, num_examples=n)
  images = datasets.normalize(images)
  k = images.shape[1] // preset.image_size
  if k > 1:
    images = images.reshape(n, preset.image_size, k, preset.image_size, k, 3).mean(axis=(2, 4))
  return images, labels


def build_model(preset: Preset, norm: str, width: int):
  return get_model("resnet20", 10, width=width, blocks_per_stage=preset.blocks_per_stage,
                   norm=norm, base_channels=preset.base_channels)


def cache_dir(out: str, name: str, preset: Preset) -> str:
  """Where a preset's trained networks live; the hash covers every training field."""
  fields = {k: v for k, v in dataclasses.asdict(preset).items() if k != "num_t"}
  digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
  return os.path.join(out, "cache", f"{name}-{digest}")


def save_variables(path: str, variables: dict) -> None:
  flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
  np.savez(path, **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def load_variables(path: str) -> dict:
  with np.load(path, allow_pickle=False) as stored:
    return traverse_util.unflatten_dict({k: jax.numpy.asarray(stored[k]) for k in stored.files},
                                        sep="/")


def optimizer(preset: Preset, num_steps: int) -> optax.GradientTransformation:
  """SGD (momentum 0.9, weight decay 5e-4) or Adam, the rate cosine-decayed to 0."""
  if preset.optimizer == "sgd":
    return step_lib.sgd_cosine(preset.learning_rate, num_steps)
  return step_lib.adamw(optax.cosine_decay_schedule(preset.learning_rate, num_steps))


def trained(preset: Preset, model, tx, seed: int, train, path: str):
  """(variables, seconds spent training: 0 when cached at `path`) of one network.

  The same `model` and `tx` objects for every seed of a width: the jitted step
  compiles once for all of them.
  """
  if os.path.exists(path):
    return load_variables(path), 0.0
  start = time.perf_counter()
  state, _ = loop.fit(model, tx, *train, batch_size=preset.batch_size,
                      num_epochs=preset.epochs, seed=seed, progress=False)
  variables = jax.device_get(state.variables)
  seconds = time.perf_counter() - start
  os.makedirs(os.path.dirname(path), exist_ok=True)
  save_variables(path, variables)
  return variables, seconds


# --- Alignment and paths. ----------------------------------------------------------------


def aligned(how: str, spec, apply_fn, start: dict, end: dict, batches) -> dict:
  """`end`'s variables permuted to match `start` ('none', 'weight' or 'activation')."""
  if how == "none":
    return end
  if how == "weight":
    perm = matching.weight_matching(spec, start["params"], end["params"])
  else:
    perm = matching.activation_matching(apply_fn, spec, start, end, batches, post=jax.nn.relu)
  return align.apply_permutation(spec, perm, end)


def end_accuracy(apply_fn, variables: dict, test_batches) -> float:
  """Test accuracy of one network as trained (its stored BatchNorm statistics)."""
  return float(counterfactual.evaluate_views(apply_fn, variables,
                                             {"test": test_batches})["test"]["accuracy"])


def pair_barriers(preset: Preset, norm: str, model, spec, start: dict, end: dict, data: dict
                  ) -> dict[str, dict[str, float]]:
  """{column: path_statistics} of one pair, for every alignment of the norm's columns."""
  ts = np.linspace(0, 1, preset.num_t)
  ends, out = {}, {}
  for column, how, renormalize in ALIGNMENTS[norm]:
    if how not in ends:
      ends[how] = aligned(how, spec, model.apply, start, end, data["stats_images"])
    path = barriers.evaluate_path(
        model.apply, (start["params"], ends[how]["params"]), ts, data["test"],
        bn_batches=data["stats"] if renormalize else None, renormalize=renormalize)
    out[column] = path_statistics(path)
  return out


def prepare_data(preset: Preset) -> dict:
  """Training arrays; test and statistics batches (stacked); activation-matching images."""
  train = load_images(preset, "train")
  test_images, test_labels = load_images(preset, "test")
  stats_images, stats_labels = train[0][:preset.num_stats], train[1][:preset.num_stats]
  batch = min(preset.batch_size, preset.num_stats)
  stats = batching.stack_batches(stats_images, stats_labels, batch, drop_remainder=True)
  return {"train": train,
          "test": batching.stack_batches(test_images, test_labels, 500),
          "stats": stats,
          "stats_images": [jax.numpy.asarray(b) for b in stats["image"]]}


# --- The sweep, its rows and its figure. -------------------------------------------------


def width_rows(preset: Preset, norm: str, width: int, data: dict, where: str, clock: dict
               ) -> list[dict]:
  """Trains (or loads) one (norm, width)'s networks; one row per (alignment, statistic)."""
  model = build_model(preset, norm, width)
  tx = optimizer(preset, preset.epochs * (len(data["train"][0]) // preset.batch_size))
  networks = []
  for seed in range(2 * preset.num_pairs):
    variables, seconds = trained(preset, model, tx, seed, data["train"],
                                 os.path.join(where, f"{norm}_w{width}_s{seed}.npz"))
    clock["train_s"] += seconds
    networks.append(variables)
  start = time.perf_counter()
  accuracies = [end_accuracy(model.apply, v, data["test"]) for v in networks]
  spec = symmetry.derive_spec(model.apply, networks[0], data["stats_images"][0])
  per_pair = [pair_barriers(preset, norm, model, spec, networks[2 * k], networks[2 * k + 1],
                            data) for k in range(preset.num_pairs)]
  clock["eval_s"] += time.perf_counter() - start
  accuracy = {"end_accuracy": mean_interval(accuracies), "end_accuracies": accuracies}
  rows = []
  for column, _, _ in ALIGNMENTS[norm]:
    for statistic in STATISTICS:
      values = [pair[column][statistic] for pair in per_pair]
      rows.append({"norm": norm, "width": width, "alignment": column, "statistic": statistic,
                   **mean_interval(values), "values": values, "num_pairs": len(values),
                   **accuracy})
  return rows


def make_figure(rows: list[dict], statistics=("mid_error", "max_loss")):
  """Barrier vs width (log2), one line per alignment with 95% CIs; a panel per norm and
  statistic (rows: statistics, columns: norms)."""
  from matplotlib.figure import Figure  # imported here: only the figure needs it

  labels = {"mid_error": "midpoint error barrier (points)", "max_loss": "max loss barrier",
            "max_error": "max error barrier (points)", "mid_loss": "midpoint loss barrier"}
  norms = [n for n in NORMS if any(r["norm"] == n for r in rows)]
  fig = Figure(figsize=(5 * len(norms), 3.6 * len(statistics)), layout="constrained")
  axes = fig.subplots(len(statistics), len(norms), squeeze=False)
  for i, statistic in enumerate(statistics):
    for j, norm in enumerate(norms):
      ax = axes[i][j]
      for column, _, _ in ALIGNMENTS[norm]:
        line = sorted((r for r in rows if (r["norm"], r["alignment"], r["statistic"])
                       == (norm, column, statistic)), key=lambda r: r["width"])
        widths = [r["width"] for r in line]
        means = np.array([r["mean"] for r in line])
        errors = np.array([[r["mean"] - r["ci_low"] for r in line],
                           [r["ci_high"] - r["mean"] for r in line]])
        ax.errorbar(widths, means, yerr=errors, marker="o", capsize=3, label=column)
      ax.set_xscale("log", base=2)
      ax.set_xticks(widths, [f"{w}x" for w in widths])
      ax.axhline(0, color="grey", lw=0.5)
      ax.set_title(f"{'BatchNorm' if norm == 'batch' else 'LayerNorm'}: {labels[statistic]}")
      ax.set_xlabel("width multiplier")
      ax.legend(fontsize=8)
  return fig


def run(name: str, out: str, figure_to: str | None = None) -> dict:
  """Runs a preset: prints a JSON line per row and a summary; writes the record and figure."""
  preset = preset_named(name)
  start = time.perf_counter()
  data = prepare_data(preset)
  where = cache_dir(out, name, preset)
  clock = {"train_s": 0.0, "eval_s": 0.0}
  rows = []
  for norm in NORMS:
    for width in preset.widths:
      for row in width_rows(preset, norm, width, data, where, clock):
        print(json.dumps({"benchmark": "width_barriers", **row}), flush=True)
        rows.append(row)
  summary = {"benchmark": "width_barriers", "preset": name, "backend": jax.default_backend(),
             "train_s": round(clock["train_s"], 1), "eval_s": round(clock["eval_s"], 1),
             "total_s": round(time.perf_counter() - start, 1), "cache": where}
  print(json.dumps(summary), flush=True)
  record = {"summary": summary, "preset": dataclasses.asdict(preset), "columns": {
      n: [c for c, _, _ in cols] for n, cols in ALIGNMENTS.items()}, "rows": rows}
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "width_barriers.json"), "w") as f:
    json.dump(record, f, indent=1)
  fig = make_figure(rows)
  for path in [os.path.join(out, "width_barriers.png")] + ([figure_to] if figure_to else []):
    fig.savefig(path, dpi=110)
  return record


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="cpu", help=f"one of {sorted(PRESETS)}")
  parser.add_argument("--out", default=DEFAULT_OUT, help="JSON record, figure and cache")
  parser.add_argument("--figure_to", default=None,
                      help="also save the figure here (e.g. docs/width_barriers.png)")
  args = parser.parse_args(argv)
  run(args.preset, args.out, args.figure_to)


if __name__ == "__main__":
  main()
