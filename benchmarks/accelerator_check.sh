#!/usr/bin/env bash
# One prepared run on an accelerator machine (a GPU lent for minutes): versions, the main
# job with the default seed mode, the training-loop and seed-ensemble benchmarks, and the
# fast test suite under the machine's jax (on its CPU backend). JSON lines and logs go to
# $OUT (or ./accelerator_out). Run from the repository root:
#   bash benchmarks/accelerator_check.sh
# The library runs from the checkout (PYTHONPATH=.): an accelerator image's jax may be
# newer than pyproject's pins.
set -uo pipefail
OUT=${OUT:-accelerator_out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
section() { echo "=== $1 ($(date +%T))"; }

section versions
$PY -c "import sys, jax, flax, optax, chex, orbax.checkpoint as o, numpy
print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax',
      optax.__version__, 'chex', chex.__version__, 'numpy', numpy.__version__)
print(jax.devices())" 2>&1 | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

section "main job (reproduce.py:cpu, default seed mode)"
start=$SECONDS
$PY -m experiments.main --config=experiments/configs/reproduce.py:cpu \
  --workdir="$OUT/reproduce" --config.finetune.progress=False \
  --config.train.progress=False > "$OUT/main_job.log" 2>&1
echo "main job exit $?, wall $((SECONDS - start)) s"
tail -12 "$OUT/main_job.log"
cp "$OUT/reproduce/report.md" "$OUT/report.md" 2>/dev/null

section "train step vs loops (full width, batch 256)"
timeout 200 $PY benchmarks/train_step.py --models=small_cnn,vgg13 --vgg_width=1.0 \
  --batch=256 --num_examples=8192 --steps=20 --repeats=5 2>&1 | tee "$OUT/train_step.jsonl"

section "seeds in turn vs vmapped (3 seeds, batch 128)"
for impl in auto patches; do
  timeout 120 $PY benchmarks/seed_ensemble.py --models=small_cnn:32,vgg13:1.0 \
    --methods=naive,cbft --conv_impl=$impl 2>&1 | tee -a "$OUT/seed_ensemble.jsonl"
done

section "fast suite under this jax (CPU backend; tfds is not on the image)"
JAX_PLATFORMS=cpu timeout 240 $PY -m pytest -q -m "not slow" -x -p no:cacheprovider \
  --ignore=tests/test_datasets.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
section done
