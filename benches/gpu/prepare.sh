#!/usr/bin/env bash
# Builds the CUDA runner binary here (no GPU needed) and stages what the GPU machine needs
# under benches/gpu/stage/ (git-ignored), under the 64 MiB carry limit: the xz-compressed
# binary, MiniLM's configuration and tokenizer (the GPU machine generates weights), and
# SmolLM2's first 2 blocks, xz-compressed. Then, from the device tool:
#   run(command="bash benches/gpu/device-check.sh", carry=["benches/gpu/stage"], timeout_s=560)
# The whole script fills its 8 minutes (issue 4's open numbers first: the Llama quantized at
# load, MiniLM's and the 4.3 GB model's snapshots verified, the ring's threads; then what
# earlier runs measured, then the larger models while time lasts); a second call takes what
# the first did not reach (a call's carry replaces the stage, so models the first call
# generated are generated again), for example:
#   run(command="ONLY='pinned H2D|17 GB' BUDGET=300 bash benches/gpu/device-check.sh", ...)
# (results.md's "failed steps" names the ones skipped for time). A session has 15 device
# minutes in all, machine starts included (~40-60 s each); on 2026-11-30 (stop 33) a first
# call lost the machine after 7 minutes and nothing came back, so a short first call (RUNS=1,
# BUDGET=300) is the safer start.
# What the results decide:
#  - bench llama-beside-init vs llama (and huge-beside-init vs huge): whether
#    RUNNER_CUDA_PRELOAD=beside-init (the driver's context made while cuBLAS loads; the
#    "CUDA device opened" line in each mode's `device_open` says when) becomes the default;
#  - the sweep's 16-thread rows against its 8-thread ones: the ring's thread cap (8) and
#    RUNNER_RESTORE_BOUNCE (21.4 GB/s on 16 threads on 2026-11-30, against 18.1 on 8);
#  - bench llama-overlap and llama-in-place vs llama, with llama_snapshot's generations and
#    GPU memory: whether RUNNER_RESTORE_OVERLAP=on (restore beside the model build) and
#    RUNNER_CUDA_QUANTIZED_RESTORE=in-place (no device copy of the quantized blocks) become
#    CUDA's defaults;
#  - the sweep's last two rows (4 mapped threads beside the ring): whether copying straight
#    from the page cache beside the ring passes the ring alone (RUNNER_RESTORE_MAPPED_THREADS);
#  - MiniLM's "without cudarc's event tracking" row: RUNNER_CUDA_EVENT_TRACKING=off by default
#    if its vectors are bit-identical and its rates no lower.
# Run on an H200 on 2026-11-28, 2026-11-30 and in stop 33; results in benches/results/.
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
# SmolLM2's first 2 of 30 blocks (with the real embeddings, tokenizer and quantization;
# 4 until stop 29, when vendor/candle-core's 1.8 MB in the tracked tree needed the room, and 3
# until stop 31, when vendor/candle-kernels' 0.9 MB and candle's kernels as machine code in
# the binary (0.5 MB compressed) did):
# the whole GGUF (98 MB) does not fit the 64 MiB carry limit, which also counts the
# tracked tree as a tar archive counts it: 512-byte headers and padding for each of its
# 9,000 files (most of them fuzz corpus inputs) make 6.8 MB of files 11.6 MB.
mkdir -p "$STAGE/smollm2/weights"
cp models/smollm2-135m-instruct/cog.yaml "$STAGE/smollm2/"
python3 benches/gpu/trim_gguf.py models/smollm2-135m-instruct/weights/SmolLM2-135M-Instruct.Q4_1.gguf \
  "$STAGE/smollm2/weights/SmolLM2-135M-Instruct-2-blocks.Q4_1.gguf" 2
xz -T0 -6 "$STAGE/smollm2/weights/SmolLM2-135M-Instruct-2-blocks.Q4_1.gguf"
cp tests/data/minilm_reference.json tests/data/smollm2_reference.json benches/data/sentences.txt benches/gpu/checks.py benches/gpu/read_ceiling.py "$STAGE/"
# The large benchmark models are generated on the GPU machine; only their cog.yaml travels.
mkdir -p "$STAGE/big" "$STAGE/huge" "$STAGE/giant"
cp models/tiny-mlp/cog.yaml "$STAGE/big/"
cp models/tiny-mlp/cog.yaml "$STAGE/huge/"
cp models/tiny-mlp/cog.yaml "$STAGE/giant/"
du -sh "$STAGE"
du -sb "$STAGE"
# The device tool carries the stage plus every tracked file, 64 MiB in all, counted as a tar
# archive would hold them (on 2026-11-30 it refused 53.9 MB of stage beside 6.8 MB of tracked
# files in 9,000 files, and took it with the fuzz corpus's 8,600 files moved aside).
TRACKED_TAR=$(git ls-files -z | tar --null -T - -cf - | wc -c)
TOTAL=$(( $(du -sb "$STAGE" | cut -f1) + TRACKED_TAR ))
echo "stage + tracked tree as a tar: $TOTAL bytes (limit $((64 << 20)), kept 1 MiB under it)"
(( TOTAL < (63 << 20) )) || { echo "prepare: over the device tool's 64 MiB carry limit" >&2; exit 1; }
