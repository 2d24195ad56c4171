#!/usr/bin/env bash
# Install the peers bench/bench_peers.py compares tunelab with, each in its own virtual environment, on the CPU
# build of torch: a constraints file pins torch so that no requirement can pull a CUDA build in.
#
#   bash bench/peers/install.sh                 # both, into ~/.cache/tunelab-peers (PEERS_DIR to change)
#   bash bench/peers/install.sh llamafactory    # one of them
#
# Versions: LLAMAFACTORY_VERSION (0.9.5), AXOLOTL_VERSION (0.19.0), TORCH_VERSION (2.13.0).
set -euo pipefail
root=${PEERS_DIR:-$HOME/.cache/tunelab-peers}
torch_version=${TORCH_VERSION:-2.13.0}
declare -A spec=(
  [llamafactory]="llamafactory==${LLAMAFACTORY_VERSION:-0.9.5}"
  [axolotl]="axolotl==${AXOLOTL_VERSION:-0.19.0}"
)
tools=("$@")
[ ${#tools[@]} -eq 0 ] && tools=(llamafactory axolotl)
for tool in "${tools[@]}"; do
  venv="$root/$tool"
  echo "== $tool -> $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "torch==$torch_version"
  echo "torch==$torch_version" > "$venv/constraints.txt"
  PIP_CONSTRAINT="$venv/constraints.txt" "$venv/bin/pip" install -q "${spec[$tool]}"
  # A torchvision or torchaudio built for another torch breaks transformers' imports (torchvision::nms, a missing
  # _torchaudio.so); text training needs neither.
  for extra in torchvision torchaudio; do
    if "$venv/bin/pip" show -q "$extra" 2>/dev/null && ! "$venv/bin/python" -c "import $extra" 2>/dev/null; then
      "$venv/bin/pip" uninstall -q -y "$extra"
    fi
  done
  "$venv/bin/python" -c "import torch; assert not torch.version.cuda, torch.__version__; print('torch', torch.__version__)"
done
