"""benchmarks/pytorch_peer.py: its flags and agreement check without torch; with torch, the
same losses from PyTorch and mechconn on a tiny VGG-13 path, and its JSON lines."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "pytorch_peer.py")
_SPEC = importlib.util.spec_from_file_location("pytorch_peer", _PATH)
peer = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(peer)

TINY = ["--device=cpu", "--width=0.0625", "--num_t=3", "--bn_examples=64", "--eval_examples=64",
        "--batch_size=32", "--repeats=1"]


def test_without_torch_the_script_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were absent
  with pytest.raises(SystemExit, match=r"pip install -e '\.\[torch\]'"):
    peer.main(TINY)


def test_defaults_follow_the_device():
  cpu = peer.parse_args([], cuda_available=False)
  assert (cpu.device, cpu.width, cpu.batch_size, cpu.precision) == ("cpu", 0.25, 128, "float32")
  gpu = peer.parse_args([], cuda_available=True)
  assert (gpu.device, gpu.width, gpu.eval_examples, gpu.precision) == ("cuda", 1.0, 10240,
                                                                        "tf32")
  explicit = peer.parse_args(["--device=cpu", "--width=0.5", "--skip=torch_compile",
                              "--strategies=vmap,chunked"])
  assert (explicit.width, explicit.skip, explicit.strategies) == (
      0.5, ["torch_compile"], ["vmap", "chunked"])


@pytest.mark.parametrize("flags, message", [
    (["--eval_examples=100"], "--eval_examples=100 must be a positive multiple of --batch_size"),
    (["--width=0"], "--width=0.0 must be positive"),
    (["--precision=tf32"], "--precision=tf32 needs --device=cuda"),
    (["--skip=torch"], "--skip: unknown method 'torch'"),
    (["--strategies=scan"], "--strategies: unknown strategy 'scan'"),
])
def test_unusable_flags_are_refused_naming_the_flag(flags, message, capsys):
  with pytest.raises(SystemExit):
    peer.parse_args(["--device=cpu", *flags])
  assert message in capsys.readouterr().err


def test_the_agreement_check_refuses_losses_beyond_the_tolerance():
  ts = np.linspace(0, 1, 3)
  reference = (np.array([2.3, 2.1, 2.4]), np.array([0.1, 0.2, 0.1]))
  close = (reference[0] + np.array([5e-5, -5e-5, 0.0]), np.array([0.1, 0.25, 0.1]))
  out = peer.check_agreement("torch_eager", close, reference, ts, "float32")
  assert out["max_abs_loss_diff"] == pytest.approx(5e-5)
  assert out["max_abs_accuracy_diff"] == pytest.approx(0.05)
  far = (reference[0] + np.array([0.0, 1e-3, 0.0]), reference[1])
  with pytest.raises(peer.Disagreement, match=r"torch_eager and mechconn disagree: at "
                                              r"t = 0\.5000 loss 2\.101000 vs 2\.100000"):
    peer.check_agreement("torch_eager", far, reference, ts, "float32")
  assert peer.check_agreement("torch_eager", far, reference, ts, "tf32")["max_abs_loss_diff"] \
      == pytest.approx(1e-3)


@pytest.mark.slow
def test_pytorch_and_mechconn_agree_and_every_line_has_its_fields(capsys):
  pytest.importorskip("torch")
  records = peer.run_benchmark(peer.parse_args(TINY))
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert lines == records
  assert [(r["method"], r["strategy"]) for r in records] == [
      ("torch_eager", None), ("torch_compile", None), ("mechconn", "map"),
      ("mechconn_core", "map")]
  for r in records:
    assert r["max_abs_loss_diff"] <= 1e-4 and r["median_s"] > 0 and r["gflops"] > 0
    assert r["speedup_vs_torch_compile"] > 0 and r["speedup_vs_torch_eager"] > 0
    assert (r["model"], r["num_t"], r["eval_examples"]) == ("vgg13(width=0.0625)", 3, 64)
  by_method = {r["method"]: r for r in records}
  # Compiled once: a train and an eval graph, no recompilation per t or per timed run.
  assert by_method["torch_compile"]["compiled_graphs"] == 2
  assert by_method["torch_eager"]["speedup_vs_torch_eager"] == 1.0
  assert by_method["mechconn"]["loss_range"] > 1e-3  # the losses vary along the path


@pytest.mark.slow
def test_pytorch_update_bn_way_agrees_and_other_work_is_refused():
  pytest.importorskip("torch")
  args = peer.parse_args(TINY)
  state_dicts = [{k: v.numpy() for k, v in peer.torch_vgg13(args.width, seed).state_dict()
                  .items()} for seed in (0, 1)]
  data, ts = peer.make_data(args), np.linspace(0, 1, 3)
  reference = peer.mechconn_method(state_dicts, data, ts, "map")[0]()
  update_bn = peer.torch_method(state_dicts, data, ts, args.width, "cpu", False,
                                "momentum_none")()
  assert peer.check_agreement("torch_eager", update_bn, reference, ts,
                              "float32")["max_abs_loss_diff"] < 1e-5
  # The same loop on another grid (t reversed) is different work: refused.
  reversed_grid = peer.torch_method(state_dicts, data, ts[::-1], args.width, "cpu", False,
                                    "accumulate")()
  with pytest.raises(peer.Disagreement, match="did different work"):
    peer.check_agreement("torch_eager", reversed_grid, reference, ts, "float32")
