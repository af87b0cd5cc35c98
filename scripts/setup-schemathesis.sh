#!/usr/bin/env bash
# Installs schemathesis (pinned by sha256 in tests/data/schemathesis-requirements.txt) into a
# virtualenv outside the clone and prints its path; tests/openapi_attack.rs runs it against
# runner's /openapi.json.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "$ROOT/scripts/setup-pyenv.sh" schemathesis "$ROOT/tests/data/schemathesis-requirements.txt"
