#!/usr/bin/env bash
# Builds the CUDA runner binary here (no GPU needed) and stages what the GPU machine needs
# under benches/gpu/stage/ (git-ignored), under the 64 MiB carry limit: the xz-compressed
# binary, MiniLM's configuration and tokenizer (the GPU machine generates weights), and
# SmolLM2's first 10 blocks, xz-compressed. Then, from the device tool:
#   run(command="bash benches/gpu/device-check.sh", carry=["benches/gpu/stage"])
# Run on an H200 on 2026-11-28; results in benches/results/2026-11-28-h200-snapshots/
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
eval "$(bash "$ROOT/../shared/cuda/setup-toolkit.sh")"
CUDAFORGE_THREADS=2 cargo build --release --locked --features cuda -p runner-cli --target-dir target/cuda
scripts/fetch-smollm2.sh
STAGE=benches/gpu/stage
rm -rf "$STAGE" && mkdir -p "$STAGE"
xz -T0 -6 -c target/cuda/release/runner > "$STAGE/runner.xz"
# MiniLM without its weights: the GPU machine generates random ones of the same shapes and
# compares runner with sentence-transformers on them.
mkdir -p "$STAGE/minilm/weights"
cp models/all-minilm-l6-v2/cog.yaml "$STAGE/minilm/"
(cd models/all-minilm-l6-v2/weights && cp -r config.json modules.json sentence_bert_config.json tokenizer.json 1_Pooling "$ROOT/$STAGE/minilm/weights/")
# SmolLM2's first 10 of 30 blocks (with the real embeddings, tokenizer and quantization):
# the whole GGUF (98 MB) does not fit the 64 MiB carry limit.
mkdir -p "$STAGE/smollm2/weights"
cp models/smollm2-135m-instruct/cog.yaml "$STAGE/smollm2/"
python3 benches/gpu/trim_gguf.py models/smollm2-135m-instruct/weights/SmolLM2-135M-Instruct.Q4_1.gguf \
  "$STAGE/smollm2/weights/SmolLM2-135M-Instruct-10-blocks.Q4_1.gguf" 10
xz -T0 -6 "$STAGE/smollm2/weights/SmolLM2-135M-Instruct-10-blocks.Q4_1.gguf"
cp tests/data/minilm_reference.json tests/data/smollm2_reference.json benches/data/sentences.txt benches/gpu/checks.py "$STAGE/"
# The large benchmark models are generated on the GPU machine; only their cog.yaml travels.
mkdir -p "$STAGE/big" "$STAGE/huge" "$STAGE/giant"
cp models/tiny-mlp/cog.yaml "$STAGE/big/"
cp models/tiny-mlp/cog.yaml "$STAGE/huge/"
cp models/tiny-mlp/cog.yaml "$STAGE/giant/"
du -sh "$STAGE"
du -sb "$STAGE"
