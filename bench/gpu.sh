#!/usr/bin/env bash
# The issue's GPU reference jobs, tunelab against plain TRL, on a bare GPU machine (torch, transformers, peft,
# accelerate; trl and datasets carried as wheels in .whl/, the tokenizer and data in .bench/, see README.md).
#
#   bash bench/gpu.sh                 # all four jobs
#   bash bench/gpu.sh 1b-full 1b-lora # some of them
#
# Results: one JSON per job in $OUT (or bench-results/), and the tables on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:src
else
  export PYTHONPATH=src
fi
export PYTHONUNBUFFERED=1
out=${OUT:-bench-results}
mkdir -p "$out"
common=(--tokenizer .bench/tokenizer --data .bench/alpaca --bf16 --block-size 1024 --steps 30 --warmup-steps 5 --packing)
declare -A jobs=(
  [135m-full]="--shape 135m --no-peft --batch-size 16"
  [1b-full]="--shape 1b --no-peft --batch-size 8"
  [1b-lora]="--shape 1b --peft --batch-size 8"
  [7b-lora]="--shape 7b --peft --batch-size 4 --gradient-checkpointing"
)
selected=("$@")
[ ${#selected[@]} -eq 0 ] && selected=(135m-full 1b-full 1b-lora 7b-lora)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for job in "${selected[@]}"; do
  echo "=== $job"
  # shellcheck disable=SC2086
  python3 bench/bench_sft.py ${jobs[$job]} "${common[@]}" --out "$out/bench-$job.json"
done
