#!/usr/bin/env bash
# Cold start vs snapshot restore on this machine, in one command: builds the release
# binary, fetches MiniLM and SmolLM2 (GGUF Q4_1, repacked at load), generates a 1.1 GB model
# whose load converts f32 to bf16 (in $RUNNER_CACHE_DIR, outside the clone), and runs
# `runner bench --cold-start` on each.
# Writes benches/results/<date>-<host kind>/ with the tables, JSON reports and charts.
#   benches/cold-start.sh [RUNS] [--drop-caches]
# RUNNER_RESTORE_CPU=copy measures the copying CPU restore instead of the mapped one (its
# files end in -copy), and RUNNER_RESTORE_READ=direct restores that read around the page
# cache (O_DIRECT; files end in -direct), for same-session comparisons.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUNS="${1:-5}"; shift || true
CACHE="${RUNNER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/runner}"
OUTDIR="benches/results/$(date -u +%Y-%m-%d)-cpu-cold-start"
mkdir -p "$OUTDIR"
cargo build --release --locked -p runner-cli
RUNNER="$ROOT/target/release/runner"
scripts/fetch-minilm.sh
scripts/fetch-smollm2.sh
BIG="$CACHE/bench-models/tiny-mlp-1g"
if [ ! -f "$BIG/weights/model.safetensors" ]; then
  mkdir -p "$BIG"
  cp models/tiny-mlp/cog.yaml "$BIG/"
  "$RUNNER" generate tiny-mlp "$BIG/weights" --hidden-size 4096 --layers 16 --dtype bf16
fi
for model in models/all-minilm-l6-v2 models/smollm2-135m-instruct "$BIG"; do
  name=$(basename "$model")
  if [ "${RUNNER_RESTORE_CPU:-}" = copy ]; then name="$name-copy"; fi
  if [ "${RUNNER_RESTORE_READ:-}" = direct ]; then name="$name-direct"; fi
  case " $* " in *" --drop-caches "*) name="$name-dropped-caches" ;; esac
  "$RUNNER" -q bench "$model" --cold-start --runs "$RUNS" --device cpu "$@" \
    --chart "$OUTDIR/$name.svg" --json-out "$OUTDIR/$name.json" | tee "$OUTDIR/$name.txt"
done
echo "results in $OUTDIR"
