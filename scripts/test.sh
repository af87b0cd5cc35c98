#!/usr/bin/env bash
# The test command: fetches the MiniLM and SmolLM2 weights and Cog's own server (both cached outside
# the clone, sha256-verified) and runs every test in the workspace, end-to-end tests and
# the conformance suite against runner and against coglet included.
# It also installs Debian's Chromium and playwright-core for the playground's browser test
# (scripts/setup-browser.sh), the Prometheus client whose parser reads /metrics, OpenAI's
# Python client (tests/openai_api.rs drives the OpenAI-compatible routes with it), and
# schemathesis, which attacks the API from its OpenAPI document (tests/openapi_attack.rs).
# RUNNER_SKIP_COGLET=1 skips the coglet half, RUNNER_SKIP_MODAL=1 the import of the
# generated modal_app.py, RUNNER_SKIP_BROWSER=1 the browser test (each test then says so
# instead of running).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
command -v cargo >/dev/null || { echo "test: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }
scripts/fetch-minilm.sh
scripts/fetch-smollm2.sh
if [ "${RUNNER_SKIP_COGLET:-0}" != 1 ] && [ -z "${RUNNER_COGLET_VENV:-}" ]; then
  RUNNER_COGLET_VENV="$(scripts/setup-coglet.sh)"
  export RUNNER_COGLET_VENV
fi
if [ "${RUNNER_SKIP_MODAL:-0}" != 1 ] && [ -z "${RUNNER_MODAL_VENV:-}" ]; then
  RUNNER_MODAL_VENV="$(scripts/setup-modal.sh)"
  export RUNNER_MODAL_VENV
fi
if [ "${RUNNER_SKIP_BROWSER:-0}" != 1 ]; then
  scripts/setup-browser.sh
fi
if [ -z "${RUNNER_PROMETHEUS_VENV:-}" ]; then
  RUNNER_PROMETHEUS_VENV="$(scripts/setup-prometheus.sh)"
  export RUNNER_PROMETHEUS_VENV
fi
if [ -z "${RUNNER_OPENAI_VENV:-}" ]; then
  RUNNER_OPENAI_VENV="$(scripts/setup-openai.sh)"
  export RUNNER_OPENAI_VENV
fi
if [ -z "${RUNNER_SCHEMATHESIS_VENV:-}" ]; then
  RUNNER_SCHEMATHESIS_VENV="$(scripts/setup-schemathesis.sh)"
  export RUNNER_SCHEMATHESIS_VENV
fi
exec cargo test --workspace --locked "$@"
