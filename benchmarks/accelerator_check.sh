#!/usr/bin/env bash
# One prepared run on an accelerator machine (a GPU lent for minutes): versions and
# whether pyproject's pins admit them, path evaluation and training throughput with FLOP
# fractions in float32 and bfloat16, and the paper-scale study on embedded data
# (reproduce.py:shapes10_paper_vgg13) end to end. JSON lines and logs go to $OUT (or
# ./accelerator_out). Run from the repository root:
#   bash benchmarks/accelerator_check.sh
# SMOKE=1 shrinks every size (and the study to its ,quicktest) to check the script on a
# CPU in a minute. The library runs from the checkout (PYTHONPATH=.): an accelerator
# image's jax may be newer than this machine's.
set -uo pipefail
OUT=${OUT:-accelerator_out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
section() { echo "=== $1 ($(date +%T))"; }
if [[ "${SMOKE:-0}" == 1 ]]; then
  PATH_ARGS="--vgg_width=0.125 --num_t=2 --eval_examples=256 --eval_batch=128 --bn_batches=1 --bn_batch=64 --repeats=1"
  STEP_ARGS="--small_cnn_width=8 --vgg_width=0.125 --batch=32 --num_examples=512 --steps=2 --repeats=1"
  STUDY="reproduce.py:shapes10_paper_vgg13,quicktest"; STUDY_LIMIT=300
else
  # As the earlier H200 figures: VGG13 full width, K = 16, BatchNorm from 2,560, eval on 10,000.
  PATH_ARGS="--vgg_width=1.0 --num_t=16 --eval_examples=10000 --eval_batch=500 --bn_batches=5 --bn_batch=512 --repeats=3"
  STEP_ARGS="--small_cnn_width=32 --vgg_width=1.0 --batch=256 --num_examples=8192 --steps=20 --repeats=3"
  STUDY="reproduce.py:shapes10_paper_vgg13"; STUDY_LIMIT=${STUDY_LIMIT:-300}
fi

section versions
$PY - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import sys, tomllib, jax
from importlib import metadata
from packaging.requirements import Requirement
print(sys.version.split()[0], jax.devices())
for line in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
  req = Requirement(line)
  try:
    have = metadata.version(req.name)
  except metadata.PackageNotFoundError:
    print(f"{req.name}: not installed (pins {req.specifier})"); continue
  verdict = "admitted" if req.specifier.contains(have, prereleases=True) else "NOT ADMITTED"
  print(f"{req.name} {have}: {verdict} by {req.specifier}")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

for dtype in float32 bfloat16; do
  section "path evaluation, VGG13, $dtype"
  timeout 100 $PY benchmarks/path_eval.py --models=vgg13 $PATH_ARGS --skip=chunked,vmap \
    --dtype=$dtype 2>&1 | grep -v '^timing' | tee -a "$OUT/path_eval.jsonl"
done

for dtype in float32 bfloat16; do
  section "train step vs loops, VGG13, $dtype"
  timeout 90 $PY benchmarks/train_step.py --models=vgg13 $STEP_ARGS --dtype=$dtype \
    2>&1 | tee -a "$OUT/train_step.jsonl"
done

section "the paper-scale study ($STUDY), limit $STUDY_LIMIT s"
start=$SECONDS
# Each log line stamped with the seconds since launch, to see where the time went.
timeout "$STUDY_LIMIT" $PY -m experiments.main --config="experiments/configs/$STUDY" \
  --workdir="$OUT/study" --config.finetune.progress=False --config.train.progress=False \
  2>&1 | while IFS= read -r line; do echo "$((SECONDS - start)) s: $line"; done \
  > "$OUT/study.log"
echo "study exit ${PIPESTATUS[0]}, wall $((SECONDS - start)) s"
tail -25 "$OUT/study.log"
cp "$OUT/study/report.md" "$OUT/study_report.md" 2>/dev/null
rm -rf "$OUT/study"
section done
