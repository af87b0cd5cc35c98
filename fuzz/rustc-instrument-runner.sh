#!/usr/bin/env bash
# A rustc wrapper (RUSTC_WRAPPER) for fuzz/run.sh's CI mode: SanitizerCoverage on runner's
# own crates and the fuzz targets only. The dependencies compile plainly, unoptimised, so all
# seven targets build in minutes on two cores; libFuzzer is then guided by coverage of
# runner's code (the recorded runs instrument everything and add AddressSanitizer).
rustc="$1"
shift
name=""
prev=""
for arg in "$@"; do
  if [ "$prev" = "--crate-name" ]; then name="$arg"; break; fi
  prev="$arg"
done
case "$name" in
  runner_* | cog_yaml | prediction_input | safetensors | gguf | snapshot | data_uri | cli_inputs)
    exec "$rustc" "$@" --cfg fuzzing -Cpasses=sancov-module \
      -Cllvm-args=-sanitizer-coverage-level=4 \
      -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
      -Cllvm-args=-sanitizer-coverage-pc-table \
      -Cllvm-args=-sanitizer-coverage-trace-compares
    ;;
  *) exec "$rustc" "$@" ;;
esac
