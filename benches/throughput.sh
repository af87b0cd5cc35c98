#!/usr/bin/env bash
# Throughput on this machine, in one command (issue 9's benchmarks): builds the release
# binary, sets up Cog's server (coglet 0.23.1) and the PyTorch baseline
# (sentence-transformers, CPU) in virtualenvs under $RUNNER_CACHE_DIR, installs wrk if it
# is missing, and runs benches/throughput.py. Writes benches/results/<date>-cpu-throughput/.
#   benches/throughput.sh [--rounds N] [--seconds S] [--soak S]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="${RUNNER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/runner}"
OUTDIR="benches/results/$(date -u +%Y-%m-%d)-cpu-throughput"
say() { printf 'throughput: %s\n' "$*" >&2; }

if ! command -v wrk >/dev/null; then
  say "installing wrk (Debian package)"
  if [ "$(id -u)" = 0 ]; then apt-get install -y wrk >/dev/null; else sudo apt-get install -y wrk >/dev/null; fi
fi
cargo build --release --locked -p runner-cli
scripts/fetch-minilm.sh
COGLET_VENV="$(scripts/setup-coglet.sh)"

# The PyTorch baseline: ~3 GB of wheels (torch pulls its CUDA libraries from PyPI even for
# CPU use), installed once. Versions are pinned; PyPI has no CPU-only torch to hash-pin.
REQS=benches/st-requirements.txt
ST_VENV="$CACHE/bench-st-venv-$(sha256sum "$REQS" | cut -c1-12)"
if [ ! -f "$ST_VENV/.complete" ]; then
  rm -rf "$ST_VENV"
  python3 -m venv "$ST_VENV"
  for attempt in 1 2 3; do
    say "installing $REQS (attempt $attempt)"
    if "$ST_VENV/bin/pip" install --disable-pip-version-check --no-cache-dir --quiet -r "$REQS"; then
      touch "$ST_VENV/.complete"
      break
    fi
    sleep $((attempt * 10))
  done
  [ -f "$ST_VENV/.complete" ] || { say "ERROR: could not install $REQS"; exit 1; }
fi

python3 benches/throughput.py --runner "$ROOT/target/release/runner" --coglet-venv "$COGLET_VENV" \
  --st-python "$ST_VENV/bin/python" --out "$OUTDIR" "$@"
say "results in $OUTDIR"
