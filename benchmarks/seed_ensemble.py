"""Benchmark: S fine-tuning seeds as S separate steps or as one vmapped step (reproduce's seed_mode).

For each model and method (naive: `step.train_step`; cbft: `finetune.cbft_step`)
it times advancing all S seeds by one step, two ways, on random 32x32x3
batches (each seed its own batch of --batch examples):
  sequential  S calls of the jitted step, one per seed's state (the default
              'sequential' seed mode);
  vmap        one call of jit(vmap(step)) over the stacked states ('vmap').
Median over --repeats timings of --steps such advances after a compile run;
`vmap_speedup` = sequential time / vmap time (> 1: the ensemble pays).

  python benchmarks/seed_ensemble.py
  python benchmarks/seed_ensemble.py --models=small_cnn:8,small_cnn:32 --seeds=3
"""

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mechconn import finetune
from mechconn import step as step_lib
from mechconn import trees
from mechconn.models import get_model

sys.path.insert(0, os.path.dirname(__file__))
from path_eval import median_seconds  # noqa: E402


def bench(name, width, method, args):
  model = get_model(name, 10, width=width, conv_impl=args.conv_impl)
  tx = step_lib.sgd_cosine(0.01, 10_000)
  rng = np.random.default_rng(0)
  seeds = list(range(args.seeds))
  images = jnp.asarray(rng.normal(size=(args.seeds, args.batch, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, size=(args.seeds, args.batch)), jnp.int32)
  init = step_lib.create_train_state(model, tx, jax.random.key(0), images[0, :1])
  if method == "cbft":
    loss_fn = finetune.CBFTLoss(model.apply, init.params, 10)
    step = functools.partial(finetune.cbft_step, loss_fn=loss_fn, tx=tx)
    batches = [{"clean_image": images[s], "clean_label": labels[s],
                "cue_image": images[s][::-1], "cue_label": labels[s][::-1]} for s in seeds]
  else:
    step = functools.partial(step_lib.train_step,
                             loss_fn=step_lib.ClassificationLoss(model.apply), tx=tx)
    batches = [{"image": images[s], "label": labels[s]} for s in seeds]
  keys = [jax.random.key(100 + s) for s in seeds]
  separate = {"states": [jax.tree.map(jnp.copy, init) for _ in seeds]}
  ensemble = {"state": trees.stack(separate["states"]), "batch": trees.stack(batches),
              "keys": jnp.stack(keys)}
  vmapped = jax.jit(jax.vmap(step), donate_argnums=0)

  def run_sequential():
    for _ in range(args.steps):
      for i in range(len(seeds)):
        separate["states"][i], metrics = step(separate["states"][i], batches[i], keys[i])
    return metrics["loss"]

  def run_vmap():
    for _ in range(args.steps):
      ensemble["state"], metrics = vmapped(ensemble["state"], ensemble["batch"],
                                           ensemble["keys"])
    return metrics["loss"]

  seq = median_seconds(run_sequential, args.repeats) / args.steps
  vec = median_seconds(run_vmap, args.repeats) / args.steps
  print(json.dumps({
      "benchmark": "seed_ensemble", "model": f"{name}(width={width})", "method": method,
      "conv_impl": args.conv_impl,
      "seeds": args.seeds, "batch_per_seed": args.batch, "backend": jax.default_backend(),
      "sequential_s_per_advance": round(seq, 4), "vmap_s_per_advance": round(vec, 4),
      "vmap_speedup": round(seq / vec, 3)}), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="small_cnn:8,small_cnn:32")
  parser.add_argument("--methods", default="naive,cbft")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--conv_impl", default="auto",
                      help="the models' convolutions: auto, xla or patches (im2col + matmul: "
                           "vmapped over seeds, a batched matmul instead of a grouped conv)")
  args = parser.parse_args()
  for spec in args.models.split(","):
    name, width = spec.split(":")
    for method in args.methods.split(","):
      bench(name, float(width) if "." in width else int(width), method, args)


if __name__ == "__main__":
  main()
