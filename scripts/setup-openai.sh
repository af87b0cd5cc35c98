#!/usr/bin/env bash
# Installs OpenAI's Python client (pinned by sha256 in tests/data/openai-requirements.txt) into a
# virtualenv outside the clone and prints its path. tests/openai_api.rs drives runner's
# OpenAI-compatible routes with it (RUNNER_OPENAI_VENV).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "$ROOT/scripts/setup-pyenv.sh" openai "$ROOT/tests/data/openai-requirements.txt"
