#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer and AddressSanitizer on the machine's stable Rust
# (RUSTC_BOOTSTRAP unlocks the -Z flags that cargo-fuzz would pass; no nightly, no
# cargo-fuzz needed) and runs them from the committed seed corpora.
#   fuzz/run.sh                   every target, FUZZ_SECONDS (default 60) each
#   fuzz/run.sh cog_yaml 600      one target for 600 s
#   FUZZ_LIGHT=1 fuzz/run.sh      only the targets that do not need the model stack
#                                 (cog_yaml, prediction_input): builds in minutes, for CI
# New corpus entries go to target/fuzz/corpus/<target>/ (the seeds in fuzz/corpus/ stay as
# they are); a crash is written to target/fuzz/artifacts/<target>/ and fails the run. Each
# run ends with one line: target, executions, seconds, coverage, result.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT/fuzz"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTC_BOOTSTRAP=1
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Zsanitizer=address -Cdebug-assertions"
TARGET_DIR="$ROOT/target/fuzz"
if [ -n "${FUZZ_LIGHT:-}" ]; then
  features=(--no-default-features)
  targets=(cog_yaml prediction_input)
else
  features=()
  targets=(cog_yaml prediction_input safetensors gguf snapshot data_uri cli_inputs)
fi
cargo build --release --locked --target "$TRIPLE" --target-dir "$TARGET_DIR/build" --bins "${features[@]}" >&2
seconds="${FUZZ_SECONDS:-60}"
if [ $# -ge 1 ]; then targets=("$1"); fi
if [ $# -ge 2 ]; then seconds="$2"; fi
# The file targets write each input to a scratch file: keep those in memory.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then export TMPDIR="${TMPDIR:-/dev/shm}"; fi
status=0
for t in "${targets[@]}"; do
  corpus="$TARGET_DIR/corpus/$t"
  artifacts="$TARGET_DIR/artifacts/$t"
  mkdir -p "$corpus" "$artifacts"
  log="$TARGET_DIR/$t.log"
  set +e
  "$TARGET_DIR/build/$TRIPLE/release/$t" "$corpus" "$ROOT/fuzz/corpus/$t" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  runs="$(grep -o 'Done [0-9]* runs' "$log" | grep -o '[0-9]*' | tail -1)"
  cov="$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1)"
  if [ "$rc" = 0 ]; then result="ok"; else result="FAILED (exit $rc; see $log and $artifacts)"; status=1; fi
  printf '%s: %s executions in %s s, %s, %s\n' "$t" "${runs:-?}" "$seconds" "${cov:-cov: ?}" "$result"
done
exit $status
