#!/usr/bin/env bash
# Installs Cog 0.23.1's prediction server (coglet) into a virtualenv outside the clone,
# from PyPI wheels pinned by sha256 (cog-spec/coglet-requirements.txt), and prints its
# path. The conformance suite and the package tests use it when RUNNER_COGLET_VENV names it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "$ROOT/scripts/setup-pyenv.sh" coglet "$ROOT/cog-spec/coglet-requirements.txt"
