#!/usr/bin/env bash
# Text generation on this machine's CPU: runner (candle:llama) beside llama.cpp on the same
# SmolLM2 GGUF, in one run. Builds the release binary, fetches the model, and builds
# llama-cpp-python 0.3.36 from source once into $RUNNER_CACHE_DIR/bench-llama-cpp (several
# minutes; never in CI). Writes benches/results/<date>-cpu-text-generation/.
#   benches/text-generation.sh [RUNS]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUNS="${1:-3}"
CACHE="${RUNNER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/runner}"
OUTDIR="benches/results/$(date -u +%Y-%m-%d)-cpu-text-generation"
VENV="$CACHE/bench-llama-cpp"
mkdir -p "$OUTDIR"
cargo build --release --locked -p runner-cli
scripts/fetch-smollm2.sh
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "text-generation: building llama-cpp-python 0.3.36 from source into $VENV (once)" >&2
  python3 -m venv "$VENV"
  CMAKE_ARGS="-DGGML_NATIVE=ON" "$VENV/bin/pip" install --no-input llama-cpp-python==0.3.36
fi
"$VENV/bin/python" benches/text_generation.py \
  --runner "$ROOT/target/release/runner" \
  --model-dir models/smollm2-135m-instruct \
  --gguf models/smollm2-135m-instruct/weights/SmolLM2-135M-Instruct.Q4_1.gguf \
  --runs "$RUNS" --json-out "$OUTDIR/text-generation.json" | tee "$OUTDIR/text-generation.md"
echo "results in $OUTDIR"
