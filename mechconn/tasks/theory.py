"""The `theory` task: the one-hidden-layer theory of the paper's Section 2 (claim C13).

On synthetic data with two predictive attributes of different complexity
(`data.two_attributes`: a linear one and a banded one, plus noise dimensions),
one-hidden-layer ReLU networks are trained, `num_seeds` each, on data where only the
linear attribute predicts (they rely on it; seeds 0..num_seeds-1) and where only
the complex one does (seeds num_seeds..2 num_seeds-1: no two networks share an
initialisation).
On data where both predict, every network is a minimiser. For pairs relying on
the same attribute (every two seeds) and on different ones (linear seed i with
complex seed i), the linear path is evaluated before and after permutation
alignment (weight matching, activation matching) on the test sets where both,
only the linear or only the complex attribute predicts, and the pair's agreement
of ReLU activation patterns (the fraction of (example, unit) whose
pre-activation has the same sign) on the both-attributes test set. In memory
(`loop.fit`, seconds per network): a relaunch recomputes the same numbers.
Writes `theory.json`.
"""

import dataclasses
import itertools
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mechconn import barriers
from mechconn import config_checks as checks
from mechconn import loop
from mechconn import symmetry
from mechconn import workdir as workdir_lib
from mechconn.data import batching
from mechconn.data import two_attributes
from mechconn.models import get_model
from mechconn.tasks import alignment
from mechconn.tasks import optim
from mechconn.tasks import runner
from mechconn.tasks import specs

NAME = "theory"
RESULT_FILE = "theory.json"
LAYOUT = workdir_lib.Layout(files=(RESULT_FILE,))
EVAL_SETS = {"both": ("linear", "complex"), "linear_only": ("linear",),
             "complex_only": ("complex",)}
ALIGNMENTS = ("none", "weight", "activation")


@dataclasses.dataclass(frozen=True)
class TwoAttributeData:
  """The synthetic two-attribute data (`data.two_attributes`)."""

  bands: int  # of the complex attribute
  noise_dims: int
  noise_scale: float
  num_train: int  # per training set (one per attribute)
  num_test: int  # per test set
  seed: int

  def make(self, predictive: tuple[str, ...], split: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of a split where the `predictive` attributes predict the label."""
    tag = {"train": 0, "test": 1}[split] * 100 + {"linear": 1, "complex": 2}.get(
        "+".join(predictive), 3)
    return two_attributes.make(self.num_train if split == "train" else self.num_test,
                               predictive, seed=self.seed + tag, bands=self.bands,
                               noise_dims=self.noise_dims, noise_scale=self.noise_scale)


@dataclasses.dataclass(frozen=True)
class TheorySpec:
  """A theory config, resolved."""

  num_seeds: int  # networks per attribute
  data: TwoAttributeData
  hidden: int
  optimizer: specs.OptimizerSpec
  batch_size: int
  num_epochs: int
  eval_batch_size: int
  path: specs.PathSpec


def resolve(config: ml_collections.ConfigDict, num_devices: int) -> TheorySpec:
  """A theory config, checked before any work, naming the field."""
  del num_devices  # the protocol's argument: `loop.fit` trains on one device
  checks.check_int(config.num_seeds, "num_seeds", minimum=2)
  data = config.data
  checks.check_int(data.bands, "data.bands", minimum=2)
  if data.bands % 2:
    raise ValueError(f"config.data.bands={data.bands} must be even (both labels need bands).")
  checks.check_int(data.noise_dims, "data.noise_dims")
  checks.check_int(data.seed, "data.seed")
  checks.check_number(data.noise_scale, "data.noise_scale", low=0.0)
  for key in ("num_train", "num_test"):
    checks.check_positive_int(data[key], f"data.{key}")
  checks.check_positive_int(config.hidden, "hidden")
  for key in ("batch_size", "num_epochs", "eval_batch_size"):
    checks.check_positive_int(config[key], key)
  specs.steps_of(config.batch_size, config.num_epochs, data.num_train)
  return TheorySpec(num_seeds=config.num_seeds, data=TwoAttributeData(**data.to_dict()),
                    hidden=config.hidden, optimizer=specs.optimizer_spec(config.optimizer),
                    batch_size=config.batch_size, num_epochs=config.num_epochs,
                    eval_batch_size=config.eval_batch_size,
                    path=specs.path_spec(config.path, statistics=False))


def hidden_signs(model: nn.Module, params, x) -> list[np.ndarray]:
  """The sign (> 0) of every hidden pre-activation of an MLP on x, one array per layer."""
  _, state = model.apply({"params": params}, jnp.asarray(x), capture_intermediates=True,
                         mutable=["intermediates"])
  flat = flax.traverse_util.flatten_dict(state["intermediates"], sep="/")
  return [np.asarray(flat[f"Dense_{i}/__call__"][0]) > 0 for i in range(len(model.hidden))]


def sign_agreement(model: nn.Module, params_a, params_b, x) -> float:
  """Fraction of (example, hidden unit) pairs whose pre-activations share their sign."""
  a, b = hidden_signs(model, params_a, x), hidden_signs(model, params_b, x)
  return float(np.mean(np.concatenate([(u == v).ravel() for u, v in zip(a, b)])))


def pairs_of(num_seeds: int) -> list[tuple[str, tuple, tuple]]:
  """(kind, network a, network b): same attribute (every two seeds), different (seed i, i)."""
  out = [(f"same: {attr}", (attr, i), (attr, j)) for attr in two_attributes.ATTRIBUTES
         for i, j in itertools.combinations(range(num_seeds), 2)]
  return out + [("different", ("linear", i), ("complex", i)) for i in range(num_seeds)]


def _train(spec: TheorySpec, model: nn.Module, tx: optax.GradientTransformation,
           tests: dict) -> tuple[dict, list[dict]]:
  """{(attribute, index): params} of every network, and what each is for the record."""
  nets, networks = {}, []
  for offset, attr in enumerate(two_attributes.ATTRIBUTES):
    x, y = spec.data.make((attr,), "train")
    for seed in range(spec.num_seeds):
      init_seed = seed + offset * spec.num_seeds
      state, history = loop.fit(model, tx, x, y, batch_size=spec.batch_size,
                                num_epochs=spec.num_epochs, progress=False, seed=init_seed)
      nets[(attr, seed)] = state.params
      accuracy = {name: float(np.mean(np.argmax(model.apply({"params": state.params},
                                                             jnp.asarray(tx_)), -1) == ty))
                  for name, (tx_, ty) in tests.items()}
      networks.append({"relies_on": attr, "index": seed, "init_seed": init_seed,
                       "train_loss": history[-1]["loss"], "test_accuracy": accuracy})
  return nets, networks


def run(spec: TheorySpec, job: runner.Job) -> dict:
  """Trains the networks, evaluates every pair's paths; returns the theory.json record."""
  start = time.perf_counter()
  model = get_model("mlp", 2, hidden=(spec.hidden,))
  steps_per_epoch, num_steps = specs.steps_of(spec.batch_size, spec.num_epochs,
                                              spec.data.num_train)
  tx, _ = optim.make_optimizer(spec.optimizer, num_steps=num_steps,
                               steps_per_epoch=steps_per_epoch)
  tests = {name: spec.data.make(attrs, "test") for name, attrs in EVAL_SETS.items()}
  eval_sets = {name: batching.stack_batches(x, y, spec.eval_batch_size)
               for name, (x, y) in tests.items()}
  nets, networks = _train(spec, model, tx, tests)
  x_both = tests["both"][0]
  perm_spec = symmetry.derive_spec(model.apply, {"params": nets[("linear", 0)]},
                                   jnp.asarray(x_both[:2]))
  ts = np.linspace(0.0, 1.0, spec.path.num_t)
  pairs = []
  for kind, a, b in pairs_of(spec.num_seeds):
    row = {"kind": kind, "a": list(a), "b": list(b)}
    for how in ALIGNMENTS:  # activation matching on the units' outputs (post ReLU)
      pb, _ = alignment.aligned_end(how, perm_spec, model.apply, {"params": nets[a]},
                                    {"params": nets[b]}, [jnp.asarray(x_both)])
      paths = jax.device_get(barriers.evaluate_path_on_sets(model.apply, (nets[a], pb), ts,
                                                            eval_sets, renormalize=None))
      row[how] = {"barriers": {name: p.summary() for name, p in paths.items()},
                  "sign_agreement": sign_agreement(model, nets[a], pb, x_both)}
    pairs.append(row)
  record = {"networks": networks, "pairs": pairs, "summary": summarise(pairs),
            "num_t": spec.path.num_t, "eval_examples": spec.data.num_test,
            "seconds": round(time.perf_counter() - start, 1), "config": job.config_dict}
  print(format_table(record))
  runner.write_outputs(job.workdir, {RESULT_FILE: record})
  return record


def summarise(pairs: list[dict]) -> dict:
  """{kind: {alignment: {'loss/<set>', 'error/<set>', 'sign_agreement': (mean, std)}}}."""
  out = {}
  for kind in dict.fromkeys(p["kind"] for p in pairs):
    rows = [p for p in pairs if p["kind"] == kind]
    out[kind] = {}
    for how in ALIGNMENTS:
      values = {"sign_agreement": [r[how]["sign_agreement"] for r in rows]}
      for name in EVAL_SETS:
        for metric in ("loss", "error"):
          values[f"{metric}/{name}"] = [r[how]["barriers"][name][metric] for r in rows]
      out[kind][how] = {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
                        for k, v in values.items()}
  return out


def format_table(record: dict) -> str:
  """Per pair kind and alignment: loss and error barriers on each test set, sign agreement."""
  lines = [f"{'pairs':14} {'alignment':10} " + " ".join(f"{n:>21}" for n in EVAL_SETS)
           + "  sign agreement"]
  for kind, by_how in record["summary"].items():
    for how, s in by_how.items():
      cells = " ".join(f"{s[f'loss/{n}']['mean']:6.3f} / {s[f'error/{n}']['mean']:.3f} "
                       f"({s[f'loss/{n}']['std']:.3f})" for n in EVAL_SETS)
      lines.append(f"{kind:14} {how:10} {cells}  {s['sign_agreement']['mean']:.3f} +- "
                   f"{s['sign_agreement']['std']:.3f}")
  return ("barriers on each test set: loss / error (std of the loss barrier), mean over pairs\n"
          + "\n".join(lines))
