#!/usr/bin/env bash
# Run here, once, from any directory (PyPI reachable): gathers what bench/gpu.sh needs on a bare GPU machine
# (torch, transformers, peft and accelerate there; no trl, no datasets, no model, no internet) into .whl/ (wheels)
# and .bench/ (the tokenizer and the data), both ignored by git and carried by the device tool:
#
#   bash bench/gpu_prepare.sh [DATA_FOLDER]      # default: ../shared/data/alpaca, else samples/alpaca.jsonl
#   # then, on the GPU machine (device tool `run`, carry [".whl", ".bench"]):  bash bench/gpu.sh
#
# The wheels are for CPython 3.12 on manylinux x86_64 (the lent machines); PY_VERSION=3.11 changes that.
# datasets 5.2 needs pyarrow >= 24: WITH_PYARROW=1 adds its wheel (~40 MB of the 64 MiB a call may carry) for a
# machine whose pyarrow is older.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
data=${1:-}
if [ -z "$data" ]; then
  for candidate in ../shared/data/alpaca /work/shared/data/alpaca samples/alpaca.jsonl; do
    if [ -e "$candidate" ]; then data=$candidate; break; fi
  done
fi
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.25.0 kernels==0.19.1 tomlkit==0.15.3 \
  ${WITH_PYARROW:+pyarrow==24.0.0}
rm -rf .bench && mkdir -p .bench
if [ -d "$data" ]; then cp -r "$data" .bench/alpaca; else mkdir -p .bench/alpaca && cp "$data" .bench/alpaca/; fi
PYTHONPATH=src "$python" -c "
from tunelab.models import load_tokenizer, resolve_model
load_tokenizer(resolve_model('HuggingFaceTB/SmolLM2-135M-Instruct')).save_pretrained('.bench/tokenizer')
"
du -sh .whl .bench
echo "ready: carry .whl and .bench to the GPU machine and run: bash bench/gpu.sh"
