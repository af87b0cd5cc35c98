#!/usr/bin/env bash
# Installs what the playground's browser test needs and prints nothing else on stdout:
#   - Debian's Chromium (/usr/bin/chromium), with apt-get when it is missing (as root, or
#     through sudo);
#   - playwright-core (pinned with its sha512 in tests/browser/package-lock.json) into
#     tests/browser/node_modules, with `npm ci`.
# Downloads are retried; npm keeps its verified cache in $RUNNER_CACHE_DIR/npm-cache.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${RUNNER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/runner}"
say() { printf 'setup-browser: %s\n' "$*" >&2; }
retry() {
  local attempt
  for attempt in 1 2 3 4; do
    if "$@"; then return 0; fi
    say "attempt $attempt of: $* failed"
    sleep $((attempt * 5))
  done
  return 1
}

if [ ! -x "${RUNNER_CHROMIUM:-/usr/bin/chromium}" ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { say "ERROR: Chromium is missing and this is not root: install it with 'apt-get install chromium' (or set RUNNER_CHROMIUM)"; exit 1; }
    SUDO="sudo"
  fi
  say "installing Debian's chromium package"
  export DEBIAN_FRONTEND=noninteractive
  retry $SUDO apt-get update -qq >&2
  retry $SUDO apt-get install -y -qq --no-install-recommends chromium >&2 \
    || { say "ERROR: could not install chromium with apt-get"; exit 1; }
fi
"${RUNNER_CHROMIUM:-/usr/bin/chromium}" --version >&2

command -v node >/dev/null || { say "ERROR: node not found; install Node.js 20 or newer (apt-get install nodejs npm)"; exit 1; }
if [ ! -f "$ROOT/tests/browser/node_modules/playwright-core/package.json" ]; then
  say "installing playwright-core with npm ci"
  mkdir -p "$CACHE/npm-cache"
  (cd "$ROOT/tests/browser" && retry npm ci --no-audit --no-fund --cache "$CACHE/npm-cache" >&2) \
    || { say "ERROR: npm ci failed in tests/browser"; exit 1; }
fi
say "ready"
