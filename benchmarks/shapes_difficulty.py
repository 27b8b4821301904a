"""Calibration of the embedded data: is the box cue the simpler attribute?

Trains a SmallCNN on shapes10 without a cue and with the box cue at
proportion p, then evaluates both on the four counterfactual views of the
test split. Prints one JSON line per model (accuracy per view, wall time).
The cue model should show the paper's signature: `cue` far above `clean`,
`rand_img` far above chance, `rand_cue` near or below `clean`.

  python benchmarks/shapes_difficulty.py                     # defaults below
  python benchmarks/shapes_difficulty.py --num_train=10000 --epochs=2   # quick
"""

import argparse
import json
import time

import jax
import numpy as np

from mechconn import counterfactual
from mechconn import loop
from mechconn import step as step_lib
from mechconn.data import datasets, pipeline, shapes, views
from mechconn.models import get_model


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_train", type=int, default=50_000)
  parser.add_argument("--num_test", type=int, default=5_000)
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--proportion", type=float, default=0.8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--noise", type=float, default=None, help="shapes10 noise (default: its own)")
  parser.add_argument("--min_size", type=float, default=None)
  parser.add_argument("--max_size", type=float, default=None)
  parser.add_argument("--min_contrast", type=float, default=None)
  args = parser.parse_args()

  knobs = {k: getattr(args, k) for k in ("noise", "min_size", "max_size", "min_contrast")
           if getattr(args, k) is not None}
  # The seeds load_base uses for the embedded train and test splits.
  x, y = shapes.shapes10(2 * args.seed, args.num_train, **knobs)
  xt, yt = shapes.shapes10(2 * args.seed + 1, args.num_test, **knobs)
  test_views = views.box_views(datasets.normalize(xt), yt, 10, seed=args.seed)
  view_batches = counterfactual.stack_views(test_views, yt, batch_size=500)
  model = get_model("small_cnn", 10, width=args.width)
  steps = args.epochs * (args.num_train // args.batch_size)
  tx = step_lib.sgd_cosine(args.lr, steps)
  for proportion in (0.0, args.proportion):
    split = pipeline.make_cue_split(x, y, 10, "box", proportion)
    data = split.examples(np.arange(len(split)))
    start = time.perf_counter()
    state, history = loop.fit(model, tx, data["image"], data["label"],
                              batch_size=args.batch_size, num_epochs=args.epochs,
                              seed=args.seed, progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "benchmark": "shapes_difficulty", "model": f"small_cnn(width={args.width})",
        "cue": "box", "proportion": proportion, "shapes10": knobs or "defaults", "num_train": args.num_train,
        "epochs": args.epochs, "train_seconds": round(seconds, 1),
        "train_accuracy_last_epoch": round(history[-1]["accuracy"], 4),
        "test_views": {name: round(float(r["accuracy"]), 4) for name, r in jax.device_get(
            counterfactual.evaluate_views(model.apply, state.variables, view_batches)).items()},
        "backend": jax.default_backend()}), flush=True)


if __name__ == "__main__":
  main()
