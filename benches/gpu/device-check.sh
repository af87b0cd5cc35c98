#!/usr/bin/env bash
# Runs on the GPU machine (see prepare.sh), within about 8 minutes:
#  1. serves MiniLM on cuda:0 and checks its embeddings against sentence-transformers';
#  2. snapshots MiniLM on cuda:0 and checks that a restored server answers bit-identically;
#  3. measures pinned host-to-device bandwidth with PyTorch (the ceiling for a restore);
#  4. runs `runner bench --cold-start` for MiniLM and for a generated 1.1 GB model whose
#     load converts f32 to bf16, and times a sentence-transformers cold start beside them.
# Writes $OUT/results.md plus the JSON reports and SVG charts. UNVERIFIED: no GPU run of
# this script has been recorded yet.
# DEVICE=cpu runs the same steps on a CPU build, as a dry run of the script itself.
set -euo pipefail
DEVICE="${DEVICE:-cuda:0}"
STAGE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/stage"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
cd "$STAGE"
python3 -c 'import lzma,shutil;shutil.copyfileobj(lzma.open("runner.xz"),open("runner","wb"))'
chmod +x runner
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU ($DEVICE)"; } | tee "$OUT/gpu.txt"

serve() {  # serve DIR LOG ARGS...: starts a server, prints its address
  local dir=$1 log=$2; shift 2
  ./runner serve "$dir" --device "$DEVICE" --port 0 "$@" > /dev/null 2> "$log" &
  echo $! > "$log.pid"
  until grep -q "^runner: " "$log"; do sleep 0.05; done
  grep "^runner: " "$log" | sed -E 's#.*http://([^ ]+).*#\1#'
}
embed() {  # embed ADDR OUTFILE
  python3 - "$1" "$2" <<'PY'
import json, sys, urllib.request
ref = json.load(open("minilm_reference.json"))
req = urllib.request.Request(f"http://{sys.argv[1]}/predictions", data=json.dumps({"input": {"text": ref["sentences"]}}).encode(), headers={"Content-Type": "application/json"})
open(sys.argv[2], "w").write(json.dumps(json.load(urllib.request.urlopen(req))["output"]))
PY
}

# 1. Correctness against sentence-transformers, cold.
t0=$(date +%s.%N)
ADDR=$(serve minilm "$OUT/serve-cold.log" --snapshot off)
t1=$(date +%s.%N)
embed "$ADDR" "$OUT/cold.json"
kill "$(cat "$OUT/serve-cold.log.pid")"
python3 - "$OUT" <<'PY' | tee "$OUT/correctness.txt"
import json, sys, math
ref = json.load(open("minilm_reference.json")); got = json.load(open(f"{sys.argv[1]}/cold.json"))
cos = [sum(a*b for a, b in zip(g, w)) / math.sqrt(sum(a*a for a in g) * sum(b*b for b in w)) for g, w in zip(got, ref["normalized_full384"])]
print(f"cosine vs sentence-transformers (min): {min(cos):.6f}")
PY

# 2. Snapshot on the GPU, restore, compare bit for bit.
./runner snapshot minilm --device "$DEVICE" > "$OUT/snapshot-path.txt" 2> "$OUT/snapshot.log"
ADDR=$(serve minilm "$OUT/serve-restored.log" --require-snapshot)
embed "$ADDR" "$OUT/restored.json"
kill "$(cat "$OUT/serve-restored.log.pid")"
if cmp -s "$OUT/cold.json" "$OUT/restored.json"; then echo "restored == cold: identical" ; else echo "restored != cold: DIFFERENT"; fi | tee -a "$OUT/correctness.txt"

# 3. The ceiling: pinned host-to-device bandwidth.
python3 - <<'PY' | tee "$OUT/pinned_h2d.txt" || echo "pinned H2D: not measured (no torch or no GPU)" > "$OUT/pinned_h2d.txt"
import torch, time
x = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True); y = torch.empty_like(x, device="cuda")
y.copy_(x, non_blocking=True); torch.cuda.synchronize()
t = time.time(); [y.copy_(x, non_blocking=True) for _ in range(5)]; torch.cuda.synchronize()
print(f"pinned H2D: {5 * x.numel() / (time.time() - t) / 1e9:.1f} GB/s")
PY

# 4. Cold vs snapshot, and PyTorch's cold start beside them.
./runner -q generate tiny-mlp big/weights --hidden-size 4096 --layers 16 --dtype bf16
./runner bench minilm --cold-start --runs 3 --device "$DEVICE" --format json --chart "$OUT/minilm.svg" > "$OUT/bench-minilm.json"
./runner bench big --cold-start --runs 3 --device "$DEVICE" --format json --chart "$OUT/big.svg" > "$OUT/bench-big.json"
python3 -c 'import time;t=time.time();from sentence_transformers import SentenceTransformer;m=SentenceTransformer("minilm/weights",device="cuda");m.encode(["warm up"]);print(round(time.time()-t,3))' > "$OUT/pytorch_cold.txt" || echo "not measured" > "$OUT/pytorch_cold.txt"
python3 - "$OUT" "$t0" "$t1" <<'PY' > "$OUT/results.md"
import json, sys
out, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
print("| what | value |\n|---|---|")
print(f"| GPU | {open(f'{out}/gpu.txt').read().strip()} |")
print(f"| runner serve MiniLM → ready, cold, first run | {t1 - t0:.3f} s |")
print(f"| sentence-transformers import + load + first encode (cuda) | {open(f'{out}/pytorch_cold.txt').read().strip()} s |")
print(f"| {open(f'{out}/pinned_h2d.txt').read().strip()} | |")
for name in ["minilm", "big"]:
    r = json.load(open(f"{out}/bench-{name}.json"))
    for m in r["modes"]:
        print(f"| {name}: {m['mode']} → ready / first prediction (median of {m['runs']}) | {m['ready_seconds']['median']:.3f} s / {m['first_prediction_seconds']['median']:.3f} s |")
    print(f"| {name}: speedup to first prediction | {r['speedup_first_prediction']:.2f}x |")
    print(f"| {name}: restore | {r['snapshot_restore_gb_per_s']:.2f} GB/s ({r['snapshot_data_bytes']/1e9:.2f} GB) |")
PY
cat "$OUT/results.md" "$OUT/correctness.txt"
