#!/usr/bin/env bash
# Text generation on this machine's CPU: runner (candle:llama) beside llama.cpp on the same
# SmolLM2 GGUF, in one run. Builds the release binary, fetches the model, and builds
# llama-cpp-python 0.3.36 from source once into $RUNNER_CACHE_DIR/bench-llama-cpp (several
# minutes; never in CI). Writes benches/results/<date>-cpu-text-generation/.
#   benches/text-generation.sh [RUNS]
# BENCH_ISA=avx2 holds both engines to AVX2 (what a CPU without AVX-512 runs): runner with
# RUNNER_CPU_KERNEL=avx2, llama.cpp built without AVX-512 and AVX-VNNI (its own venv).
# BENCH_ISA=avxvnni: AVX2 plus AVX-VNNI (Intel's client CPUs since Alder Lake), both engines.
# BENCH_TAG=name adds "-name" to the result files, so a second run the same day keeps the first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUNS="${1:-3}"
CACHE="${RUNNER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/runner}"
OUTDIR="benches/results/$(date -u +%Y-%m-%d)-cpu-text-generation"
VENV="$CACHE/bench-llama-cpp"
CMAKE_FLAGS="-DGGML_NATIVE=ON"
NAME=text-generation
ISA_NOTE=""
# llama.cpp held to AVX2, without AVX-512; AVX-VNNI on or off by BENCH_ISA.
AVX2_ONLY="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF"
case "${BENCH_ISA:-}" in
  "") ;;
  avx2)
    CMAKE_FLAGS="$AVX2_ONLY -DGGML_AVX_VNNI=OFF"
    ISA_NOTE="both held to AVX2: runner RUNNER_CPU_KERNEL=avx2, llama.cpp built without AVX-512/AVX-VNNI" ;;
  avxvnni)
    CMAKE_FLAGS="$AVX2_ONLY -DGGML_AVX_VNNI=ON"
    ISA_NOTE="both held to AVX2 + AVX-VNNI: runner RUNNER_CPU_KERNEL=avxvnni, llama.cpp built with AVX-VNNI and without AVX-512" ;;
  *)
    echo "text-generation: BENCH_ISA=${BENCH_ISA} is not one this script knows (avx2, avxvnni)" >&2
    exit 2 ;;
esac
if [ -n "${BENCH_ISA:-}" ]; then
  VENV="$CACHE/bench-llama-cpp-$BENCH_ISA"
  NAME="text-generation-$BENCH_ISA"
  export RUNNER_CPU_KERNEL="$BENCH_ISA"
fi
NAME="$NAME${BENCH_TAG:+-$BENCH_TAG}"
mkdir -p "$OUTDIR"
cargo build --release --locked -p runner-cli
scripts/fetch-smollm2.sh
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "text-generation: building llama-cpp-python 0.3.36 from source into $VENV (once)" >&2
  python3 -m venv "$VENV"
  # --no-cache-dir: pip would otherwise reuse a wheel built with other flags.
  CMAKE_ARGS="$CMAKE_FLAGS" "$VENV/bin/pip" install --no-input --no-cache-dir llama-cpp-python==0.3.36
fi
"$VENV/bin/python" benches/text_generation.py \
  --runner "$ROOT/target/release/runner" \
  --model-dir models/smollm2-135m-instruct \
  --gguf models/smollm2-135m-instruct/weights/SmolLM2-135M-Instruct.Q4_1.gguf \
  --runs "$RUNS" --isa "$ISA_NOTE" --json-out "$OUTDIR/$NAME.json" | tee "$OUTDIR/$NAME.md"
echo "results in $OUTDIR"
