"""Figures for people: example grids of the views; accuracy along paths."""

import numpy as np


def displayable(images: np.ndarray) -> np.ndarray:
  """Model inputs -> RGB in [0, 1] for display.

  Complex images live in [-1, 1]; the top half of a 64-row Dominoes image is
  the simple image in [0, 1] and is shown as it is.
  """
  images = np.asarray(images, np.float32)
  out = (images + 1.0) / 2.0
  if images.shape[1] == 2 * images.shape[2]:
    half = images.shape[1] // 2
    out[:, :half] = images[:, :half]
  return np.clip(out, 0.0, 1.0)


def save_view_grid(views: dict[str, np.ndarray], labels: np.ndarray, path: str, *,
                   num_examples: int = 8, class_names=None) -> None:
  """Saves a PNG: one row per view, the same `num_examples` test examples in each.

  Args:
    views: {view name: images [N, H, W, 3]} (e.g. from `views.box_views`).
    labels: [N] labels, shown above each example.
    path: where to write the PNG.
    num_examples: columns.
    class_names: optional names indexed by label.
  """
  import matplotlib  # lazily: only figures need it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(views)
  height, width = next(iter(views.values())).shape[1:3]
  fig, axes = plt.subplots(len(names), num_examples, squeeze=False,
                           figsize=(1.1 * num_examples, 1.25 * len(names) * height / width))
  for row, name in enumerate(names):
    shown = displayable(views[name][:num_examples])
    for col in range(num_examples):
      ax = axes[row, col]
      ax.imshow(shown[col], interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if row == 0:
        label = int(labels[col])
        ax.set_title(class_names[label] if class_names else str(label), fontsize=7)
      if col == 0:
        ax.set_ylabel(name, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


VIEW_STYLES = {"clean": ("tab:blue", "-"), "cue": ("tab:orange", "-"),
               "rand_cue": ("tab:green", "--"), "rand_img": ("tab:red", "--")}


def plot_path_views(record: dict, path: str, *, metric: str = "accuracy") -> None:
  """Saves a PNG in the style of the paper's Figure 4: `metric` along t.

  One panel per path (e.g. 'linear', 'linear (aligned)', a fitted curve), one
  line per view; panel titles carry the Definition 5 verdict.

  Args:
    record: an `eval_path` record: {'ts': [...], 'paths': {name: {'views':
      {view: {'loss': [...], 'accuracy': [...]}}, 'mechanistically_connected',
      'broken_views'}}}.
    path: where to write the PNG.
    metric: 'accuracy' or 'loss'.
  """
  import matplotlib  # lazily: only figures need it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(record["paths"])
  fig, axes = plt.subplots(1, len(names), squeeze=False, sharey=True,
                           figsize=(3.6 * len(names), 3.2))
  for ax, name in zip(axes[0], names):
    entry = record["paths"][name]
    for view, values in entry["views"].items():
      colour, style = VIEW_STYLES.get(view, (None, "-"))
      ax.plot(record["ts"], values[metric], style, color=colour, marker=".", label=view)
    verdict = ("mechanistically connected" if entry.get("mechanistically_connected")
               else "broken: " + ", ".join(entry.get("broken_views", [])))
    ax.set_title(f"{name}\n{verdict}", fontsize=9)
    ax.set_xlabel("t  (0: start model, 1: end model)")
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel(metric)
  if metric == "accuracy":
    axes[0, 0].set_ylim(0.0, 1.02)
  axes[0, -1].legend(fontsize=8, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _pyplot():
  import matplotlib  # lazily: only figures need it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_finetune_views(record: dict, path: str) -> None:
  """Grouped bars: accuracy per view (mean, std over seeds) of the cue model and each method."""
  plt = _pyplot()
  views = list(record["cue_model"]["views"])
  rows = {"cue model": {v: (record["cue_model"]["views"][v]["accuracy"], 0.0) for v in views}}
  for method, row in record["methods"].items():
    rows[method] = {v: (row["views"][v]["mean"], row["views"][v]["std"]) for v in views}
  fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 3.2))
  width = 0.8 / len(views)
  for i, view in enumerate(views):
    colour = VIEW_STYLES.get(view, (None, "-"))[0]
    xs = np.arange(len(rows)) + (i - (len(views) - 1) / 2) * width
    ax.bar(xs, [r[view][0] for r in rows.values()], width, yerr=[r[view][1] for r in rows.values()],
           color=colour, label=view, capsize=2)
  ax.set_xticks(np.arange(len(rows)), list(rows))
  ax.set_ylabel("test accuracy")
  ax.set_ylim(0, 1.02)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8, ncol=len(views), loc="upper center", bbox_to_anchor=(0.5, 1.18))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_finetune_paths(record: dict, path: str) -> None:
  """Loss on cue data along the linear path from the cue model (t = 0) to each fine-tuned model."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(4.8, 3.4))
  for method, row in record["methods"].items():
    ax.plot(record["ts"], row["path_loss_mean"], marker=".", label=method)
  ax.set_xlabel("t  (0: cue model, 1: fine-tuned model)")
  ax.set_ylabel("loss on the cue view (mean over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
