#!/usr/bin/env bash
# Installs the Prometheus Python client (pinned by sha256 in tests/data/prometheus-requirements.txt)
# into a virtualenv outside the clone and prints its path. The metrics test parses /metrics
# with its text-format parser (RUNNER_PROMETHEUS_VENV).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "$ROOT/scripts/setup-pyenv.sh" prometheus "$ROOT/tests/data/prometheus-requirements.txt"
