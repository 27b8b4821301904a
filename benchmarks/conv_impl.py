"""Per-layer profile: each conv layer of a model, XLA's conv vs patches + matmul.

For every convolution of the model (shapes captured by a Flax interceptor) it
times, at the given batch size, XLA's `lax.conv_general_dilated` and
`layers.conv_as_matmul` on that layer's exact shapes, and also the whole
forward pass (eval mode). Prints one JSON line per layer (GFLOP/s of each
implementation, which one `conv_impl='auto'` picks, the layer's share of the
conv FLOPs) and a summary line with the matmul peak measured in the same run.
This is the profile behind the `auto` rule in mechconn/models/layers.py and
behind the FLOP/s figures of benchmarks/path_eval.py.

  python benchmarks/conv_impl.py --model=vgg13 --width=0.25 --batch=256
"""

import argparse
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mechconn.models import get_model, layers

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from path_eval import matmul_peak_flops, median_seconds  # noqa: E402


def conv_shapes(model, image_shape, batch):
  """[(name, input shape, kernel shape, strides, padding)] of every nn.Conv call."""
  found = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
      x = args[0]
      c_in = x.shape[-1]
      k = tuple(context.module.kernel_size)
      found.append((context.module.name, tuple(x.shape), k + (c_in, context.module.features),
                    tuple(context.module.strides), context.module.padding))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch,) + image_shape)))
  return found


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="vgg13")
  parser.add_argument("--width", type=float, default=0.25)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  image_shape = (32, 32, 3)
  width = int(args.width) if args.model == "small_cnn" else args.width
  model = get_model(args.model, 10, width=width)
  peak = matmul_peak_flops()
  rng = np.random.default_rng(0)
  total_flops = 0.0
  total_time = {"xla": 0.0, "patches": 0.0, "auto": 0.0}
  rows = []
  for name, x_shape, w_shape, strides, padding in conv_shapes(model, image_shape, args.batch):
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
    pads = tuple(tuple(p) for p in padding)
    dn = ("NHWC", "HWIO", "NHWC")
    xla = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, strides, pads,
                                                            dimension_numbers=dn))
    patches = jax.jit(lambda x, w: layers.conv_as_matmul(x, w, strides, pads))
    out = xla(x, w)
    flops = 2.0 * np.prod(out.shape) * np.prod(w_shape[:3])
    t_xla = median_seconds(lambda: xla(x, w), args.repeats)
    t_patches = median_seconds(lambda: patches(x, w), args.repeats)
    auto = "patches" if layers.prefers_patches(out.shape[1], out.shape[2], x.shape[3]) else "xla"
    total_flops += flops
    total_time["xla"] += t_xla
    total_time["patches"] += t_patches
    total_time["auto"] += t_patches if auto == "patches" else t_xla
    rows.append({"benchmark": "conv_layer", "model": f"{args.model}(width={args.width})",
                 "layer": name, "input": list(x_shape), "kernel": list(w_shape),
                 "strides": list(strides), "gflop": round(flops / 1e9, 3),
                 "gflops_xla": round(flops / t_xla / 1e9, 1),
                 "gflops_patches": round(flops / t_patches / 1e9, 1), "auto_picks": auto,
                 "ms_auto": round(1e3 * (t_patches if auto == "patches" else t_xla), 2)})
  for row in rows:
    row["share_of_conv_time"] = round(row["ms_auto"] / 1e3 / total_time["auto"], 3)
    print(json.dumps(row), flush=True)

  variables = model.init(jax.random.key(0), jnp.zeros((2,) + image_shape))
  x = jnp.asarray(rng.normal(size=(args.batch,) + image_shape), jnp.float32)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  t_forward = median_seconds(lambda: forward(variables, x), args.repeats)
  train_fwd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])
  t_train_fwd = median_seconds(lambda: train_fwd(variables, x), args.repeats)
  print(json.dumps({
      "benchmark": "conv_summary", "model": f"{args.model}(width={args.width})",
      "batch": args.batch, "peak_gflops": round(peak / 1e9, 1),
      "convs_only_gflops_auto": round(total_flops / total_time["auto"] / 1e9, 1),
      "convs_only_gflops_xla": round(total_flops / total_time["xla"] / 1e9, 1),
      "forward_eval_gflops": round(total_flops / t_forward / 1e9, 1),
      "forward_train_mode_gflops": round(total_flops / t_train_fwd / 1e9, 1),
      "forward_eval_ms": round(1e3 * t_forward, 2),
      "forward_train_mode_ms": round(1e3 * t_train_fwd, 2),
      "convs_only_ms_auto": round(1e3 * total_time["auto"], 2),
      "non_conv_share_of_eval_forward": round(1 - total_time["auto"] / t_forward, 3),
  }), flush=True)


if __name__ == "__main__":
  main()
