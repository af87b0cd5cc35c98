#!/usr/bin/env bash
# Installs Cog 0.23.1's prediction server (coglet) into a virtualenv outside the clone,
# from PyPI wheels pinned by sha256 (cog-spec/coglet-requirements.txt), retrying
# downloads. Prints the virtualenv's path on stdout; the conformance suite uses it when
# RUNNER_COGLET_VENV names it. A second run with the venv in place does nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQS="$ROOT/cog-spec/coglet-requirements.txt"
CACHE="${RUNNER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/runner}"
PYTHON="${PYTHON:-python3}"
say() { printf 'setup-coglet: %s\n' "$*" >&2; }

command -v "$PYTHON" >/dev/null || { say "ERROR: $PYTHON not found; install Python 3.11 with venv and pip"; exit 1; }
STAMP="$(sha256sum "$REQS" | cut -c1-12)"
VENV="$CACHE/coglet-venv-$STAMP"
if [ -x "$VENV/bin/python" ] && [ -f "$VENV/.complete" ]; then
  say "coglet already installed in $VENV"
  echo "$VENV"
  exit 0
fi
rm -rf "$VENV"
mkdir -p "$CACHE/pip-cache"
"$PYTHON" -m venv "$VENV"
for attempt in 1 2 3 4; do
  say "installing cog==0.23.1 from PyPI (attempt $attempt)"
  if "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --quiet \
       --cache-dir "$CACHE/pip-cache" --only-binary=:all: --require-hashes -r "$REQS" \
       >"$CACHE/coglet-pip.log" 2>&1; then
    touch "$VENV/.complete"
    say "coglet ready in $VENV"
    echo "$VENV"
    exit 0
  fi
  tail -n 5 "$CACHE/coglet-pip.log" >&2
  sleep $((attempt * 5))
done
say "ERROR: could not install cog==0.23.1 from PyPI after 4 attempts (log: $CACHE/coglet-pip.log)"
exit 1
