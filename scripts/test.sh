#!/usr/bin/env bash
# The test command: fetches the MiniLM weights (cached, sha256-verified) and runs every
# test in the workspace, end-to-end tests included.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
command -v cargo >/dev/null || { echo "test: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }
scripts/fetch-minilm.sh
exec cargo test --workspace --locked "$@"
