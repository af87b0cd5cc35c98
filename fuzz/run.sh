#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer on the machine's stable Rust (RUSTC_BOOTSTRAP unlocks
# the -Z flags that cargo-fuzz would pass; no nightly, no cargo-fuzz needed) and runs them from
# the committed seed corpora.
#   fuzz/run.sh                   every target, FUZZ_SECONDS (default 60) each: everything
#                                 instrumented, AddressSanitizer on (about 23 min to build on
#                                 two cores); the runs recorded in fuzz/RESULTS.md
#   fuzz/run.sh cog_yaml 600      one target for 600 s
#   FUZZ_CI=1 fuzz/run.sh         every target, built in about 4 min: coverage of runner's own
#                                 crates only, no AddressSanitizer, dependencies unoptimised
#                                 (fuzz/rustc-instrument-runner.sh); what CI runs
# FUZZ_SEED fixes libFuzzer's random seed (0, the default, draws one); CI fixes it so a red
# run reproduces. FUZZ_TARGET_DIR (default target/fuzz) holds the build; new corpus entries go to
# $FUZZ_TARGET_DIR/corpus/<target>/ (the seeds in fuzz/corpus/ stay as they are); a crash is
# written to $FUZZ_TARGET_DIR/artifacts/<target>/ and fails the run. Each run ends with one
# line: target, executions, seconds, coverage, result.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT/fuzz"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTC_BOOTSTRAP=1
TARGET_DIR="${FUZZ_TARGET_DIR:-$ROOT/target/fuzz}"
targets=(cog_yaml prediction_input safetensors gguf snapshot data_uri cli_inputs structured)
if [ -n "${FUZZ_CI:-}" ]; then
  RUSTC_WRAPPER="$ROOT/fuzz/rustc-instrument-runner.sh" cargo build --locked --target "$TRIPLE" \
    --target-dir "$TARGET_DIR/ci" --bins --config 'profile.dev.debug=0' \
    --config 'profile.dev.opt-level=1' --config 'profile.dev.package."*".opt-level=0' >&2
  BIN_DIR="$TARGET_DIR/ci/$TRIPLE/debug"
else
  export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Zsanitizer=address -Cdebug-assertions"
  cargo build --release --locked --target "$TRIPLE" --target-dir "$TARGET_DIR/build" --bins >&2
  BIN_DIR="$TARGET_DIR/build/$TRIPLE/release"
fi
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
  "$BIN_DIR/$t" "$corpus" "$ROOT/fuzz/corpus/$t" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -artifact_prefix="$artifacts/" -print_final_stats=1 -seed="${FUZZ_SEED:-0}" >"$log" 2>&1
  rc=$?
  set -e
  runs="$(grep -o 'Done [0-9]* runs' "$log" | grep -o '[0-9]*' | tail -1 || true)"
  cov="$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1 || true)"
  if [ "$rc" = 0 ]; then result="ok"; else result="FAILED (exit $rc; see $log and $artifacts)"; status=1; fi
  printf '%s: %s executions in %s s, %s, %s\n' "$t" "${runs:-?}" "$seconds" "${cov:-cov: ?}" "$result"
done
exit $status
