"""Times of spec derivation and weight matching, per model (JSON lines).

For each model: `symmetry.derive_spec` (tracing, from shapes only) against
building the written spec where there is one, and `matching.weight_matching`
of two independently initialised networks (medians after a warm-up call).

  python benchmarks/alignment.py --models=resnet18,vit --repeats=3
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mechconn import align
from mechconn import matching
from mechconn import symmetry
from mechconn.models import get_model

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from path_eval import median_seconds  # noqa: E402

MODELS = {"resnet18": {"width": 1.0}, "vgg13": {"width": 1.0},
          "vit": {"width": 192, "depth": 6, "num_heads": 3, "patch_size": 4}}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", default="resnet18,vit")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  for name in args.models.split(","):
    model = get_model(name, 10, **MODELS[name])
    a = model.init(jax.random.key(0), jnp.zeros(x.shape))
    b = model.init(jax.random.key(1), jnp.zeros(x.shape))
    derive = median_seconds(lambda: symmetry.derive_spec(model.apply, a, x), args.repeats)
    spec = symmetry.derive_spec(model.apply, a, x)
    start = time.perf_counter()
    perm = matching.weight_matching(spec, a["params"], b["params"])
    first = time.perf_counter() - start
    match = median_seconds(lambda: matching.weight_matching(spec, a["params"], b["params"]),
                           args.repeats)
    moved = np.mean([np.mean(p != np.arange(len(p))) for p in perm.values()])
    print(json.dumps({
        "model": name, "kwargs": MODELS[name],
        "params": int(sum(np.size(l) for l in jax.tree.leaves(a["params"]))),
        "groups": len(spec.names), "derive_spec_s": round(derive, 4),
        "written_spec": name in align.WRITTEN_SPECS,
        "weight_matching_s": round(match, 3), "weight_matching_first_s": round(first, 3),
        "fraction_of_units_moved": round(float(moved), 3),
        "backend": jax.default_backend()}))


if __name__ == "__main__":
  main()
