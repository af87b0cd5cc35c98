#!/usr/bin/env bash
# Installs a pinned requirements file (every wheel with its sha256) into a virtualenv
# outside the clone, retrying downloads, and prints the virtualenv's path on stdout.
#   scripts/setup-pyenv.sh NAME REQUIREMENTS_FILE
# The virtualenv is $RUNNER_CACHE_DIR/NAME-venv-<hash of the file>; a second run with it in
# place does nothing. Used for Cog's own server (setup-coglet.sh) and Modal's client.
set -euo pipefail
NAME="${1:?usage: setup-pyenv.sh NAME REQUIREMENTS_FILE}"
REQS="${2:?usage: setup-pyenv.sh NAME REQUIREMENTS_FILE}"
CACHE="${RUNNER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/runner}"
PYTHON="${PYTHON:-python3}"
say() { printf 'setup-%s: %s\n' "$NAME" "$*" >&2; }

command -v "$PYTHON" >/dev/null || { say "ERROR: $PYTHON not found; install Python 3.11 with venv and pip"; exit 1; }
[ -f "$REQS" ] || { say "ERROR: $REQS not found"; exit 1; }
STAMP="$(sha256sum "$REQS" | cut -c1-12)"
VENV="$CACHE/$NAME-venv-$STAMP"
LOG="$CACHE/$NAME-pip.log"
if [ -x "$VENV/bin/python" ] && [ -f "$VENV/.complete" ]; then
  say "already installed in $VENV"
  echo "$VENV"
  exit 0
fi
rm -rf "$VENV"
mkdir -p "$CACHE/pip-cache"
"$PYTHON" -m venv "$VENV"
for attempt in 1 2 3 4; do
  say "installing $(basename "$REQS") from PyPI (attempt $attempt)"
  if "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --quiet \
       --cache-dir "$CACHE/pip-cache" --only-binary=:all: --require-hashes -r "$REQS" \
       >"$LOG" 2>&1; then
    touch "$VENV/.complete"
    say "ready in $VENV"
    echo "$VENV"
    exit 0
  fi
  tail -n 5 "$LOG" >&2
  sleep $((attempt * 5))
done
say "ERROR: could not install $REQS from PyPI after 4 attempts (log: $LOG)"
exit 1
