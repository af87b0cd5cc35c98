#!/usr/bin/env bash
# Builds the CUDA runner binary here (no GPU needed) and stages what the GPU machine needs
# under benches/gpu/stage/ (git-ignored): the xz-compressed binary and the MiniLM model
# directory with its weights converted to f16 (44 MB, under the 64 MiB carry limit; runner
# loads them as f32). Then, from the device tool:
#   run(command="bash benches/gpu/device-check.sh", carry=["benches/gpu/stage"])
# Run on an H200 on 2026-11-28; results in benches/results/2026-11-28-h200-snapshots/
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
eval "$(bash "$ROOT/../shared/cuda/setup-toolkit.sh")"
CUDAFORGE_THREADS=2 cargo build --release --locked --features cuda -p runner-cli --target-dir target/cuda
scripts/fetch-minilm.sh
STAGE=benches/gpu/stage
rm -rf "$STAGE" && mkdir -p "$STAGE"
xz -T0 -6 -c target/cuda/release/runner > "$STAGE/runner.xz"
mkdir -p "$STAGE/minilm"
cp models/all-minilm-l6-v2/cog.yaml "$STAGE/minilm/"
cp -r models/all-minilm-l6-v2/weights "$STAGE/minilm/weights"
# f32 → f16 with the standard library only (struct's 'e' format), tensor by tensor.
python3 - "$STAGE/minilm/weights/model.safetensors" <<'PY'
import json, struct, sys
path = sys.argv[1]
raw = open(path, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n]); data = raw[8 + n:]
out_header, chunks, offset = {}, [], 0
for name, t in header.items():
    if name == "__metadata__":
        out_header[name] = t; continue
    b, e = t["data_offsets"]; blob = data[b:e]
    if t["dtype"] == "F32":
        count = len(blob) // 4
        blob = struct.pack(f"<{count}e", *struct.unpack(f"<{count}f", blob))
        t = dict(t, dtype="F16")
    out_header[name] = dict(t, data_offsets=[offset, offset + len(blob)])
    chunks.append(blob); offset += len(blob)
h = json.dumps(out_header).encode(); h += b" " * (-len(h) % 8)
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h))); f.write(h); [f.write(c) for c in chunks]
PY
cp tests/data/minilm_reference.json "$STAGE/"
# The large benchmark model is generated on the GPU machine; only its cog.yaml travels.
mkdir -p "$STAGE/big" && cp models/tiny-mlp/cog.yaml "$STAGE/big/"
du -sh "$STAGE"
