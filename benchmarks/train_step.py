"""Benchmark: training throughput of the jitted train step (examples/s).

For each model, on random 32x32x3 batches (default 128 examples):
  step     `step.train_step` alone (donated state, data already on device);
  loop     the train task's inner loop with the host pipeline: the batch of the
           step gathered, normalised and cued in numpy on a shapes10 box-cue
           split, copied to the devices (`data.steps.StepBatches`, 'host'),
           then the step; its ratio to `step` is the host data overhead;
  loop_device  the same loop with the device pipeline (`data.steps.loop_inputs`:
           the split on the devices, the epoch's indices uploaded once, and the
           step's own program gathering and cueing its batch; 'device', the
           default where the data fits);
  forward  the inference forward pass on the same batch, the baseline in the
           same run (a train step costs about 3 forwards: forward, backward for
           activations and for weights);
  curve    a curve-fitting step (`curves.CurveLoss`, quadratic Bezier): one
           forward and backward at one point of the curve, plus forming that
           point from three parameter copies; its ratio to `step` should be
           near 1;
  cbft     a CBFT iteration (`finetune.cbft_step`, invariance loss on): a
           barrier step on a cue batch at an interpolated point, then a clean
           step whose train-mode pass takes the clean and the cue batch
           together (the invariance loss needs the cue batch's features), so
           about 3 batch passes of forward and backward against the naive
           step's 1; examples/s counts clean examples (one batch per
           iteration), so its `vs_step` is the CBFT / naive time ratio.
Each figure is the median over --repeats timings of --steps steps after a
warm-up (compile) run. GFLOP/s come from the layer shapes (`mechconn.flops`:
a step is 3 forwards, a CBFT iteration 3 steps' worth); the float32 matmul
peak of the compute dtype (`--dtype`: float32, or bfloat16 compute with float32
parameters, as `model.dtype`) is measured in the same run.

  python benchmarks/train_step.py                       # SmallCNN(32), VGG13(0.5)
  python benchmarks/train_step.py --models=vgg13 --vgg_width=0.25 --batch=64
"""

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mechconn import curves
from mechconn import finetune
from mechconn import flops as flops_lib
from mechconn import mesh as mesh_lib
from mechconn import step as step_lib
from mechconn.data import pipeline
from mechconn.models import get_model
from mechconn.data import steps as data_steps

sys.path.insert(0, os.path.dirname(__file__))
from path_eval import median_seconds, peaks  # noqa: E402


def bench_model(label, model, args, peak, split):
  mesh = mesh_lib.data_mesh()
  tx = step_lib.sgd_cosine(0.05, 10_000)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32)
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(rng.integers(0, 10, args.batch))}
  loss_fn = step_lib.ClassificationLoss(model.apply)
  key = jax.random.key(1)
  step = functools.partial(step_lib.train_step, root_key=key, loss_fn=loss_fn, tx=tx)
  holder = {"state": step_lib.create_train_state(model, tx, jax.random.key(0),
                                                 batch["image"][:1])}
  # FLOPs from the layer shapes (mechconn.flops; XLA's cost analysis misses cuDNN convs):
  # a step is the forward and the backward's two products per layer.
  forward_flops = flops_lib.forward_flops(model.apply, holder["state"].variables,
                                          batch["image"].shape)
  step_flops = flops_lib.TRAIN_STEP_FORWARDS * forward_flops
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))

  def steps_only():
    for _ in range(args.steps):
      holder["state"], metrics = step(holder["state"], batch)
    return metrics["loss"]

  loops = {mode: data_steps.loop_inputs_for(step, split, args.batch, 0, mesh, mode)
           for mode in ("host", "device")}

  def full_loop(mode="host"):
    loop_step, batch_fn = loops[mode]
    start = int(holder["state"].step)
    for s in range(start, start + args.steps):
      holder["state"], metrics = loop_step(holder["state"], batch_fn(s))
    return metrics["loss"]

  def forwards():
    for _ in range(args.steps):
      out = forward(holder["state"].variables, batch["image"])
    return out

  ends = [model.init(jax.random.key(k), batch["image"][:1]) for k in (2, 3)]
  curve_loss = curves.CurveLoss(model.apply, "bezier", ends[0]["params"], ends[1]["params"],
                                ends[0].get("batch_stats", {}))
  free = (jax.tree.map(jnp.copy, holder["state"].params),)  # steps donate their state
  curve_holder = {"state": step_lib.fresh_state(free, tx)}
  curve_step = functools.partial(step_lib.train_step, root_key=key, loss_fn=curve_loss, tx=tx)
  curve_flops = step_flops  # one step at one point of the curve

  def curve_steps():
    for _ in range(args.steps):
      curve_holder["state"], metrics = curve_step(curve_holder["state"], batch)
    return metrics["loss"]

  cbft_loss = finetune.CBFTLoss(model.apply, ends[0]["params"], 10)
  cbft_batch = {"clean_image": batch["image"], "clean_label": batch["label"],
                "cue_image": batch["image"][::-1], "cue_label": batch["label"][::-1]}
  cbft_state = jax.tree.map(jnp.copy, holder["state"])  # steps donate their state
  cbft_holder = {"state": cbft_state}
  cbft_step = functools.partial(finetune.cbft_step, root_key=key, loss_fn=cbft_loss, tx=tx)
  cbft_flops = 3 * step_flops  # a step on the cue batch, then one on clean + cue batches

  def cbft_steps():
    for _ in range(args.steps):
      cbft_holder["state"], metrics = cbft_step(cbft_holder["state"], cbft_batch)
    return metrics["loss"]

  seconds = {name: median_seconds(fn, args.repeats) / args.steps
             for name, fn in (("forward", forwards), ("step", steps_only), ("loop", full_loop),
                              ("loop_device", functools.partial(full_loop, "device")),
                              ("curve", curve_steps), ("cbft", cbft_steps))}
  flops = {"forward": forward_flops, "step": step_flops, "loop": step_flops,
           "loop_device": step_flops,
           "curve": curve_flops, "cbft": cbft_flops}
  for name, s in seconds.items():
    print(json.dumps({
        "benchmark": "train_step", "model": label, "what": name, "batch": args.batch,
        "dtype": args.dtype, "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "median_s_per_step": round(s, 5),
        "examples_per_s": round(args.batch / s, 1),
        "vs_forward": round(s / seconds["forward"], 2),
        "vs_step": round(s / seconds["step"], 3),
        "gflops": round(flops[name] / s / 1e9, 1),
        "fraction_of_peak": round(flops[name] / s / peak, 3)}), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="small_cnn,vgg13")
  parser.add_argument("--small_cnn_width", type=int, default=32)
  parser.add_argument("--vgg_width", type=float, default=0.5)
  parser.add_argument("--resnet_width", type=float, default=0.25)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--num_examples", type=int, default=4096, help="of the loops' split")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="the models' compute dtype (parameters stay float32)")
  args = parser.parse_args()
  peak = peaks()[args.dtype]
  split = pipeline.load_train_split("shapes10", "box", 0.8, num_examples=args.num_examples)
  widths = {"small_cnn": args.small_cnn_width, "vgg13": args.vgg_width,
            "resnet18": args.resnet_width}
  for name in args.models.split(","):
    if name not in widths:
      raise ValueError(f"Unknown benchmark model {name!r}; valid: {sorted(widths)}.")
    model = get_model(name, 10, width=widths[name], dtype=args.dtype)
    bench_model(f"{name}(width={widths[name]})", model, args, peak, split)


if __name__ == "__main__":
  main()
