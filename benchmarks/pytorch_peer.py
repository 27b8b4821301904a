"""Benchmark: mechconn against PyTorch on the same VGG-13 weights along the same linear path.

Work per run: two VGG-13s (the official Mechanistic Mode Connectivity code's
PyTorch layout, `layers.{i}.conv1`, `layers.{i}.bn1`, `linear`; random
weights from two seeds, BatchNorm affine parameters randomised so that the
per-t losses differ), imported into mechconn with
`torch_import.import_state_dict('mmc_vgg13', ...)`. At each of K = --num_t
points t of linspace(0, 1, K) on the linear path (1 - t) * a + t * b:
BatchNorm statistics recomputed exactly from --bn_examples images (the
average over the batches of each batch's mean and unbiased variance), then
the mean cross-entropy and accuracy over --eval_examples images, in batches
of --batch_size. Data: random 32x32x3 images and labels in 10 classes, the
same arrays for both (NHWC for JAX; the NCHW view of the same memory, i.e.
channels_last, for PyTorch). Defaults, CPU / GPU: width 0.25 / 1.0, K = 16, BatchNorm
from 1,024 / 2,560, eval on 2,048 / 10,240, batches of 128 / 256.

Methods (median seconds over --repeats runs after one warm-up run):
  torch_eager:   the model in channels_last; per t the weights are written in
                 place (`copy_` of `torch.lerp(a, b, t)`), the BatchNorm
                 statistics reset and recomputed in train mode under no_grad,
                 then the eval batches in eval mode;
  torch_compile: the same loop calling `torch.compile(model)`, compiled once
                 (in the warm-up run, both train and eval graphs): the weights
                 change in place, so no t recompiles (`compiled_graphs`
                 reports the count after the timed runs);
  mechconn:      `barriers.evaluate_path` with the backend's default strategy
                 (`--strategies` adds others): what a user calls, eager input
                 checks included;
  mechconn_core: its pure core, `barriers.path_metrics` under `jax.jit` (no
                 eager checks: the difference is their cost per call).
Each JSON line: the median, `speedup_vs_torch_compile` and
`speedup_vs_torch_eager` (that method's time / this method's time: > 1 means
this method is faster), the largest per-t loss difference to mechconn, and
achieved GFLOP/s (layer-shape FLOPs, `mechconn.flops`).

The BatchNorm convention: PyTorch's running_var is the *unbiased* variance;
mechconn's default recomputed statistics are biased. mechconn runs with
renormalize='batchnorm_unbiased' (the same maths, same cost), so both compute
the same numbers. PyTorch's own exact reset (`momentum=None`, as
`torch.optim.swa_utils.update_bn`) reads `num_batches_tracked` to the host in
every BatchNorm call: a graph break under torch.compile and a device sync on
CUDA. The default `--torch_bn_reset=accumulate` is exact and free of both: it
runs the batches with momentum 1.0 (running stats = that batch's) and averages
them with `torch._foreach_add_`; `--torch_bn_reset=momentum_none` times the
update_bn way (torch.compile then captures the scalar, no graph break).

The check (before any timing; a non-zero exit if it fails): every method's
per-t losses equal mechconn's within `TOLERANCE` (float32: rtol = atol = 1e-4,
several hundred times the ~2e-7 measured on a CPU; with TF32 on a GPU, 1e-2,
see `TOLERANCE`). On a GPU `--precision=tf32` (the default) lets both use TF32,
JAX's default for float32 convolutions and matmuls (PyTorch:
cudnn.allow_tf32 and matmul precision 'high'); `--precision=float32` turns TF32
off in both.

Threads: `--threads` sets torch.set_num_threads (default: every core this
process may use); XLA:CPU always uses every core, so keep the default for a
fair comparison on a CPU.

  python benchmarks/pytorch_peer.py                  # GPU: width 1.0; CPU: width 0.25
  python benchmarks/pytorch_peer.py --device=cpu --num_t=4 --eval_examples=512 --repeats=3
  python benchmarks/pytorch_peer.py --strategies=map,vmap,chunked --repeats=5   # on a GPU

Needs torch (pip install -e '.[torch]'). Measured: see docs/performance.md.
"""

import argparse
import collections
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mechconn import barriers
from mechconn import flops as flops_lib
from mechconn import torch_import
from mechconn.models import layers, vgg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from path_eval import median_seconds  # noqa: E402

METHODS = ("torch_eager", "torch_compile", "mechconn", "mechconn_core")
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
# {precision: (rtol, atol)} for the per-t losses. float32: the orders of summation and the
# convolution algorithms differ, ~2e-7 measured on a CPU; TF32 rounds every conv input to 10
# mantissa bits (2^-11 ~ 5e-4 relative), differently in cuDNN's and XLA's kernels.
TOLERANCE = {"float32": (1e-4, 1e-4), "tf32": (1e-2, 1e-2)}
# Defaults per device: {flag: (cpu, cuda)}.
DEVICE_DEFAULTS = {"width": (0.25, 1.0), "bn_examples": (1024, 2560),
                   "eval_examples": (2048, 10240), "batch_size": (128, 256)}
TORCH_MISSING = ("benchmarks/pytorch_peer.py needs PyTorch, an optional extra of mechconn: "
                 "run pip install -e '.[torch]' in the repository root.")


class Disagreement(RuntimeError):
  """A method's per-t losses differ from mechconn's: the methods did different work."""


def require_torch():
  """The torch module, or SystemExit saying how to install it."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit(TORCH_MISSING) from None
  return torch


def torch_vgg13(width: float, seed: int):
  """The official MMC code's VGG-13 in PyTorch (state dict layout 'mmc_vgg13'), random weights.

  PyTorch's default initialisation; BatchNorm weights U(0.5, 1.5) and biases N(0, 0.1), so the
  two end points differ in more than their convolutions.
  """
  torch = require_torch()
  nn = torch.nn
  torch.manual_seed(seed)
  blocks, c_in = [], IMAGE_SHAPE[-1]
  for channels, stride in vgg.VGG13_CFG:
    c_out = layers.scaled(channels, width)
    blocks.append(nn.Sequential(collections.OrderedDict(
        conv1=nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        bn1=nn.BatchNorm2d(c_out), relu=nn.ReLU(inplace=True))))
    c_in = c_out
  net = nn.Sequential(collections.OrderedDict(
      layers=nn.Sequential(*blocks), pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
      linear=nn.Linear(c_in, NUM_CLASSES)))
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
  return net


def make_data(args) -> dict[str, np.ndarray]:
  """Random images and labels, stacked [num_batches, batch_size, ...] (NHWC), seed 0."""
  rng = np.random.default_rng(0)
  b = args.batch_size
  return {"bn_images": rng.normal(size=(args.bn_examples // b, b) + IMAGE_SHAPE)
                          .astype(np.float32),
          "eval_images": rng.normal(size=(args.eval_examples // b, b) + IMAGE_SHAPE)
                            .astype(np.float32),
          "eval_labels": rng.integers(0, NUM_CLASSES, (args.eval_examples // b, b))
                            .astype(np.int64)}


def mechconn_method(state_dicts, data, ts, strategy: str, checked: bool = True):
  """(fn() -> (loss [K], accuracy [K]), model, variables of a): `barriers.evaluate_path`
  (checked) or its pure core `barriers.path_metrics` under `jax.jit` (no eager checks)."""
  (model, va), (_, vb) = (torch_import.import_state_dict("mmc_vgg13", sd)
                          for sd in state_dicts)
  points = (va["params"], vb["params"])
  eval_batches = {"image": jnp.asarray(data["eval_images"]),
                  "label": jnp.asarray(data["eval_labels"].astype(np.int32)),
                  "mask": jnp.ones(data["eval_labels"].shape, jnp.float32)}
  bn_batches = {"image": jnp.asarray(data["bn_images"])}
  kwargs = dict(strategy=strategy, renormalize="batchnorm_unbiased")
  core = jax.jit(lambda points, ts, ev, bn: barriers.path_metrics(
      model.apply, points, ts, {"eval": ev}, bn, **kwargs)["eval"])
  ts_device = jnp.asarray(ts, jnp.float32)

  def run():
    if checked:
      out = barriers.evaluate_path(model.apply, points, ts, eval_batches,
                                   bn_batches=bn_batches, **kwargs)
    else:
      out = core(points, ts_device, eval_batches, bn_batches)
    return np.asarray(out.loss), np.asarray(out.accuracy)

  return run, model, va


def _reset_batchnorm(torch, bns, bn_reset: str, forward, bn_images):
  """Exact BatchNorm statistics of the current weights over `bn_images` (train mode)."""
  for m in bns:
    m.reset_running_stats()
  if bn_reset == "momentum_none":  # PyTorch's cumulative average (update_bn)
    for x in bn_images:
      forward(x)
    return
  stats = [s for m in bns for s in (m.running_mean, m.running_var)]
  sums = [torch.zeros_like(s) for s in stats]
  for x in bn_images:  # momentum 1.0: the running stats are this batch's
    forward(x)
    torch._foreach_add_(sums, stats)  # pylint: disable=protected-access
  torch._foreach_div_(sums, float(len(bn_images)))  # pylint: disable=protected-access
  torch._foreach_copy_(stats, sums)  # pylint: disable=protected-access


def torch_method(state_dicts, data, ts, width: float, device: str, compiled: bool,
                 bn_reset: str):
  """fn() -> (loss [K], accuracy [K]) of a PyTorch loop over t (module docstring)."""
  torch = require_torch()
  net = torch_vgg13(width, seed=0).to(device, memory_format=torch.channels_last)
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for m in bns:
    m.momentum = None if bn_reset == "momentum_none" else 1.0
  names = [name for name, _ in net.named_parameters()]
  params = [p for _, p in net.named_parameters()]
  ends = [[torch.from_numpy(sd[n]).to(device).to(p) for n, p in zip(names, params)]
          for sd in state_dicts]
  forward = net
  if compiled:
    if bn_reset == "momentum_none":  # float(num_batches_tracked) in the graph, no break
      torch._dynamo.config.capture_scalar_outputs = True  # pylint: disable=protected-access
    forward = torch.compile(net)
  # NHWC [N, B, H, W, C] permuted to [N, B, C, H, W]: each batch is channels_last as it is.
  bn_images = torch.from_numpy(data["bn_images"]).to(device).permute(0, 1, 4, 2, 3)
  eval_images = torch.from_numpy(data["eval_images"]).to(device).permute(0, 1, 4, 2, 3)
  eval_labels = torch.from_numpy(data["eval_labels"]).to(device)
  num_eval = eval_labels.numel()
  assert bn_images[0].is_contiguous(memory_format=torch.channels_last)

  @torch.no_grad()
  def run():
    losses, accuracies = [], []
    for t in ts:
      for p, a, b in zip(params, *ends):
        p.copy_(torch.lerp(a, b, float(t)))
      net.train()
      _reset_batchnorm(torch, bns, bn_reset, forward, bn_images)
      net.eval()
      loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
      for x, y in zip(eval_images, eval_labels):
        logits = forward(x)
        loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
      losses.append(loss / num_eval)
      accuracies.append(correct / num_eval)
    out = torch.stack([torch.stack(losses), torch.stack(accuracies)]).cpu().numpy()
    return out[0], out[1]

  return run


def compiled_graphs(torch) -> int:
  """How many graphs torch.compile has built in this process."""
  counters = torch._dynamo.utils.counters  # pylint: disable=protected-access
  return int(counters["stats"]["unique_graphs"])


def check_agreement(name: str, out, reference, ts, precision: str) -> dict:
  """{max_abs_loss_diff, max_abs_accuracy_diff} of `out` against mechconn's (loss, accuracy);
  raises Disagreement if the losses differ by more than `TOLERANCE[precision]`."""
  (loss, accuracy), (ref_loss, ref_accuracy) = out, reference
  rtol, atol = TOLERANCE[precision]
  diff = np.abs(loss - ref_loss)
  if not np.all(diff <= atol + rtol * np.abs(ref_loss)):
    i = int(np.argmax(diff - rtol * np.abs(ref_loss)))
    raise Disagreement(
        f"{name} and mechconn disagree: at t = {ts[i]:.4f} loss {loss[i]:.6f} vs "
        f"{ref_loss[i]:.6f} (|diff| {diff[i]:.2e}; tolerance rtol {rtol}, atol {atol}, "
        f"precision {precision}). Losses: {name} {np.round(loss, 6).tolist()}, mechconn "
        f"{np.round(ref_loss, 6).tolist()}. The two did different work: timing them is "
        "meaningless.")
  return {"max_abs_loss_diff": float(diff.max()),
          "max_abs_accuracy_diff": float(np.abs(accuracy - ref_accuracy).max())}


def configure_backends(torch, device: str, precision: str) -> None:
  """TF32 on or off in both frameworks (only a GPU has TF32; see the module docstring); on a
  GPU, cuDNN picks its convolution algorithms by timing them, as XLA's autotuner does."""
  if precision == "float32" and device == "cuda":  # XLA:CPU computes float32 exactly anyway
    jax.config.update("jax_default_matmul_precision", "highest")
  if device == "cuda":
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")


def run_benchmark(args) -> list[dict]:
  """Checks every method against mechconn, times them; the JSON records (also printed)."""
  torch = require_torch()
  torch.set_num_threads(args.threads)
  configure_backends(torch, args.device, args.precision)
  state_dicts = [{k: v.numpy() for k, v in torch_vgg13(args.width, seed).state_dict().items()}
                 for seed in (0, 1)]
  data, ts = make_data(args), np.linspace(0.0, 1.0, args.num_t)
  default = barriers.DEFAULT_STRATEGY.get(jax.default_backend(), "map")
  reference_fn, model, va = mechconn_method(state_dicts, data, ts, default)
  reference = reference_fn()  # also mechconn's compile
  methods = {}
  for m in ("torch_eager", "torch_compile"):
    if m not in args.skip:
      methods[m] = (None, torch_method(state_dicts, data, ts, args.width, args.device,
                                       m == "torch_compile", args.torch_bn_reset))
  for s in dict.fromkeys([default] + args.strategies):
    for m in ("mechconn", "mechconn_core"):
      if m not in args.skip:
        methods[f"{m}[{s}]"] = (s, reference_fn if (m, s) == ("mechconn", default) else
                                mechconn_method(state_dicts, data, ts, s, m == "mechconn")[0])
  seconds, agreement = {}, {}
  for name, (_, fn) in methods.items():
    print(f"timing {name}", file=sys.stderr, flush=True)

    def check(out, name=name):
      agreement[name] = check_agreement(name, out, reference, ts, args.precision)

    seconds[name] = median_seconds(fn, args.repeats, check=check)
  flops = flops_lib.forward_flops(model.apply, va, (1,) + IMAGE_SHAPE) * args.num_t * (
      args.bn_examples + args.eval_examples)
  records = [_record(name, strategy, seconds, agreement[name], flops, torch, args,
                     reference[0]) for name, (strategy, _) in methods.items()]
  for r in records:
    print(json.dumps(r), flush=True)
  return records


def _record(name, strategy, seconds, agreement, flops, torch, args, ref_loss) -> dict:
  """One JSON line."""
  s = seconds[name]
  return {
      "benchmark": "pytorch_peer", "method": name.split("[")[0], "strategy": strategy,
      "is_default": (None if strategy is None else
                     strategy == barriers.DEFAULT_STRATEGY.get(jax.default_backend(), "map")),
      "model": f"vgg13(width={args.width})", "num_t": args.num_t,
      "bn_examples": args.bn_examples, "eval_examples": args.eval_examples,
      "batch_size": args.batch_size, "median_s": round(s, 4),
      "speedup_vs_torch_compile": (round(seconds["torch_compile"] / s, 3)
                                   if "torch_compile" in seconds else None),
      "speedup_vs_torch_eager": (round(seconds["torch_eager"] / s, 3)
                                 if "torch_eager" in seconds else None),
      **agreement, "loss_range": float(np.ptp(ref_loss)),
      "gflops": round(flops / s / 1e9, 1),
      "compiled_graphs": compiled_graphs(torch) if name == "torch_compile" else None,
      "torch_bn_reset": args.torch_bn_reset if name.startswith("torch") else None,
      "device": args.device, "jax_backend": jax.default_backend(),
      "jax_device": str(jax.devices()[0].device_kind), "precision": args.precision,
      "torch_threads": torch.get_num_threads(), "cpu_cores": len(os.sched_getaffinity(0)),
      "torch": torch.__version__, "jax": jax.__version__}


def parse_args(argv=None, cuda_available: bool | None = None):
  """The flags, with the per-device defaults (`DEVICE_DEFAULTS`) filled in and checked."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                      help="PyTorch's device (default: cuda if available); JAX must match")
  for flag, (cpu, cuda) in DEVICE_DEFAULTS.items():
    parser.add_argument(f"--{flag}", type=type(cpu), default=None,
                        help=f"default {cpu} on cpu, {cuda} on cuda")
  parser.add_argument("--num_t", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--skip", default="", help=f"comma-separated methods of {METHODS}")
  parser.add_argument("--strategies", default="",
                      help="comma-separated mechconn strategies besides the default")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="torch.set_num_threads (XLA:CPU uses every core regardless)")
  parser.add_argument("--precision", choices=tuple(TOLERANCE), default=None,
                      help="tf32 (default on cuda) or float32 (always on cpu)")
  parser.add_argument("--torch_bn_reset", choices=("accumulate", "momentum_none"),
                      default="accumulate")
  args = parser.parse_args(argv)
  if args.device is None:
    if cuda_available is None:
      cuda_available = require_torch().cuda.is_available()
    args.device = "cuda" if cuda_available else "cpu"
  for flag, defaults in DEVICE_DEFAULTS.items():
    if getattr(args, flag) is None:
      setattr(args, flag, defaults[args.device == "cuda"])
  args.precision = args.precision or ("tf32" if args.device == "cuda" else "float32")
  args.skip = [s for s in args.skip.split(",") if s]
  args.strategies = [s for s in args.strategies.split(",") if s]
  _check_args(parser, args)
  return args


def _check_args(parser, args) -> None:
  """parser.error naming the flag for values the benchmark cannot use."""
  for name in args.skip:
    if name not in METHODS:
      parser.error(f"--skip: unknown method {name!r}; valid: {METHODS}")
  for s in args.strategies:
    if s not in barriers.STRATEGIES:
      parser.error(f"--strategies: unknown strategy {s!r}; valid: {barriers.STRATEGIES}")
  for flag in ("bn_examples", "eval_examples"):
    n = getattr(args, flag)
    if n <= 0 or n % args.batch_size:
      parser.error(f"--{flag}={n} must be a positive multiple of --batch_size="
                   f"{args.batch_size} (every batch full, the same batches for both)")
  if args.num_t < 2:
    parser.error(f"--num_t={args.num_t}: a path needs at least 2 points")
  if not args.width > 0:
    parser.error(f"--width={args.width} must be positive (a multiplier of VGG-13's channels)")
  if args.device == "cpu" and args.precision == "tf32":
    parser.error("--precision=tf32 needs --device=cuda (a CPU has no TF32)")


def main(argv=None):
  args = parse_args(argv)
  if args.device == "cpu":
    jax.config.update("jax_platforms", "cpu")  # before JAX starts a backend
  backend = jax.default_backend()
  if (backend == "cpu") != (args.device == "cpu"):
    raise SystemExit(f"pytorch_peer: PyTorch on {args.device} but JAX on {backend}: install "
                     "jax[cuda] (or pass --device=cpu) so both run on the same device.")
  try:
    run_benchmark(args)
  except Disagreement as e:
    raise SystemExit(f"pytorch_peer: {e}") from None


if __name__ == "__main__":
  main()
