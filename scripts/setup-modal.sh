#!/usr/bin/env bash
# Installs Modal's client (modal==1.6.4, pinned by sha256 in tests/data/modal-requirements.txt)
# into a virtualenv outside the clone and prints its path. The package tests import the
# generated modal_app.py with it (RUNNER_MODAL_VENV); no Modal account is needed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "$ROOT/scripts/setup-pyenv.sh" modal "$ROOT/tests/data/modal-requirements.txt"
