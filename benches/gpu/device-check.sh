#!/usr/bin/env bash
# Runs on the GPU machine (see prepare.sh), within about 6 minutes:
#  1. serves MiniLM on cuda:0 and checks its embeddings against sentence-transformers';
#  2. snapshots MiniLM and the big model on cuda:0, restores each through both CUDA restore
#     paths (pinned ring; pageable, the fallback) and checks every tensor bit for bit
#     against the cold load, and that restored servers answer bit-identically;
#  3. measures pinned host-to-device bandwidth with PyTorch (the ceiling for a restore);
#  4. runs `runner bench --cold-start` for MiniLM and for a generated 1.1 GB model whose
#     load converts f32 to bf16 (page cache warm, then dropped), with each restore path, and
#     times PyTorch cold starts of the same two models beside them.
# Every step has its own time limit and a failed step does not stop the others. $OUT gets
# at most 8 files (the device tool's limit): results.md, correctness.txt, the bench JSON
# reports and charts, and logs.tar.gz with everything else.
# DEVICE=cpu runs the same steps on a CPU build, as a dry run of the script itself.
# ONLY=REGEX runs only the steps whose names match (a short re-check); RUNS, BUDGET,
# SWEEP_THREADS and SWEEP_PIECES_MIB size the rest.
set -uo pipefail
DEVICE="${DEVICE:-cuda:0}"
BIG_HIDDEN="${BIG_HIDDEN:-4096}"   # 16 layers of 4096x4096 f32: 1.07 GB of weights
RUNS="${RUNS:-3}"
STAGE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/stage"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
WORK="$(mktemp -d)"
cd "$STAGE"
python3 -c 'import lzma,shutil;shutil.copyfileobj(lzma.open("runner.xz"),open("runner","wb"))'
chmod +x runner
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU ($DEVICE)"; } | tee "$WORK/gpu.txt"
nproc > "$WORK/cpus.txt"

FAILED=()
# The whole script stops starting steps after BUDGET seconds, so the report always comes
# back inside the device tool's 10-minute limit.
DEADLINE=$(( $(date +%s) + ${BUDGET:-420} ))
step() {  # step NAME SECONDS COMMAND...: runs a step with a time limit; a failure is noted
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  if [ -n "${ONLY:-}" ] && ! [[ "$name" =~ $ONLY ]]; then echo "== $name: not selected (ONLY)"; return; fi
  if (( left < 15 )); then echo "== $name: SKIPPED (out of time)"; FAILED+=("$name (skipped)"); return; fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s)"
  local t=$(date +%s.%N)
  if timeout "$limit" bash -o pipefail -c '"$@"' step "$@"; then
    echo "== $name: ok in $(python3 -c "import time;print(round(time.time()-$t,1))") s"
  else
    echo "== $name: FAILED (exit $?)"; FAILED+=("$name")
  fi
}

serve() {  # serve DIR LOG ARGS...: starts a server, prints its address; fails after 120 s
  local dir=$1 log=$2; shift 2
  ./runner serve "$dir" --device "$DEVICE" --port 0 "$@" > /dev/null 2> "$log" &
  local pid=$!
  echo $pid > "$log.pid"
  for _ in $(seq 2400); do
    if grep -q "^runner: " "$log"; then
      grep "^runner: " "$log" | sed -E 's#.*http://([^ ]+).*#\1#'; return 0
    fi
    kill -0 $pid 2>/dev/null || { echo "server exited:" >&2; tail -5 "$log" >&2; return 1; }
    sleep 0.05
  done
  kill $pid; return 1
}
embed() {  # embed ADDR OUTFILE
  python3 - "$1" "$2" <<'PY'
import json, sys, urllib.request
ref = json.load(open("minilm_reference.json"))
req = urllib.request.Request(f"http://{sys.argv[1]}/predictions", data=json.dumps({"input": {"text": ref["sentences"]}}).encode(), headers={"Content-Type": "application/json"})
open(sys.argv[2], "w").write(json.dumps(json.load(urllib.request.urlopen(req, timeout=120))["output"]))
PY
}
serve_and_embed() {  # serve_and_embed LOG OUTFILE SERVE-ARGS...
  local log=$1 out=$2; shift 2
  local addr; addr=$(serve minilm "$log" "$@") || return 1
  embed "$addr" "$out"; local rc=$?
  kill "$(cat "$log.pid")"; wait "$(cat "$log.pid")" 2>/dev/null
  return $rc
}

# 1. Correctness against sentence-transformers, cold.
cold_correctness() {
  local t0; t0=$(date +%s.%N)
  serve_and_embed "$WORK/serve-cold.log" "$WORK/cold.json" --snapshot off || return 1
  python3 - "$WORK" <<'PY' | tee -a "$WORK/correctness.txt"
import json, sys, math
ref = json.load(open("minilm_reference.json")); got = json.load(open(f"{sys.argv[1]}/cold.json"))
cos = [sum(a*b for a, b in zip(g, w)) / math.sqrt(sum(a*a for a in g) * sum(b*b for b in w)) for g, w in zip(got, ref["normalized_full384"])]
diff = max(abs(a - b) for g, w in zip(got, ref["normalized_full384"]) for a, b in zip(g, w))
print(f"MiniLM on {sys.argv[1] and 'the device'}: cosine vs sentence-transformers' reference, min {min(cos):.7f}; max abs diff {diff:.2e}")
PY
}
export DEVICE RUNS WORK SWEEP_THREADS SWEEP_PIECES_MIB
export -f serve embed serve_and_embed cold_correctness
step "MiniLM cold, against the reference" 180 cold_correctness

# 2. Snapshot on the GPU; restore through each path and compare bit for bit.
snapshot_roundtrip() {
  local mode
  for mode in pageable pinned; do  # the pinned path's snapshot stays for the servers
    RUNNER_CUDA_RESTORE=$mode ./runner snapshot minilm --device "$DEVICE" --verify > "$WORK/snapshot-path.txt" 2> "$WORK/snapshot-$mode.log" || { tail -3 "$WORK/snapshot-$mode.log"; return 1; }
    grep -h "verified" "$WORK/snapshot-$mode.log" | sed "s/^/MiniLM ($mode): /" | tee -a "$WORK/correctness.txt"
  done
  for mode in pinned pageable; do
    RUNNER_CUDA_RESTORE=$mode serve_and_embed "$WORK/serve-restored-$mode.log" "$WORK/restored-$mode.json" --require-snapshot || return 1
    if cmp -s "$WORK/cold.json" "$WORK/restored-$mode.json"; then
      echo "restored ($mode) == cold: bit-identical outputs"
    else
      echo "restored ($mode) != cold: DIFFERENT"; return 1
    fi | tee -a "$WORK/correctness.txt"
    grep -h "restored .* tensors" "$WORK/serve-restored-$mode.log" | tail -1 | tee -a "$WORK/correctness.txt"
  done
}
export -f snapshot_roundtrip
step "MiniLM snapshot round trip" 180 snapshot_roundtrip

# 3. The ceiling: pinned host-to-device bandwidth.
pinned_h2d() {
  python3 - <<'PY' | tee "$WORK/pinned_h2d.txt"
import torch, time
x = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True); y = torch.empty_like(x, device="cuda")
y.copy_(x, non_blocking=True); torch.cuda.synchronize()
t = time.time(); [y.copy_(x, non_blocking=True) for _ in range(5)]; torch.cuda.synchronize()
print(f"{5 * x.numel() / (time.time() - t) / 1e9:.1f}")
PY
}
export -f pinned_h2d
step "pinned H2D bandwidth" 60 pinned_h2d

# 4. Cold vs snapshot, per restore path, and PyTorch's cold starts beside them.
step "generate the big model" 120 ./runner -q generate tiny-mlp big/weights --hidden-size "$BIG_HIDDEN" --layers 16 --dtype bf16
verify_big() {
  local mode
  for mode in pinned pageable; do
    RUNNER_CUDA_RESTORE=$mode ./runner snapshot big --device "$DEVICE" --verify > /dev/null 2> "$WORK/snapshot-big-$mode.log" || { tail -3 "$WORK/snapshot-big-$mode.log"; return 1; }
    grep -h "verified" "$WORK/snapshot-big-$mode.log" | sed "s/^/big ($mode): /" | tee -a "$WORK/correctness.txt"
  done
}
export -f verify_big
step "big model snapshot, verified tensor by tensor" 150 verify_big
bench() {  # bench NAME DIR MODE RUNS ARGS...: uses DIR's snapshot when there is one
  local name=$1 dir=$2 mode=$3 runs=$4; shift 4
  local snap; snap=$(ls "$dir"/.runner/*.rsnap 2>/dev/null | grep -v cpu | head -1)
  RUNNER_CUDA_RESTORE=$mode ./runner bench "$dir" --cold-start --runs "$runs" --device "$DEVICE" --format json \
    --chart "$WORK/$name.svg" ${snap:+--snapshot "$snap"} "$@" > "$WORK/bench-$name.json" 2> "$WORK/bench-$name.log"
}
export -f bench
pytorch_minilm() {
  python3 -c 'import time;t=time.time();from sentence_transformers import SentenceTransformer;m=SentenceTransformer("minilm/weights",device="cuda");m.encode(["warm up"]);print(round(time.time()-t,3))' > "$WORK/pytorch_minilm.txt"
}
export -f pytorch_minilm
pytorch_big() {  # what a user would write instead: load the safetensors to the GPU as bf16, one matmul
  python3 - > "$WORK/pytorch_big.txt" <<'PY'
import time; t = time.time()
import torch, glob
from safetensors.torch import load_file
w = {}
for f in sorted(glob.glob("big/weights/*.safetensors")):
    w.update({k: v.to("cuda", torch.bfloat16) for k, v in load_file(f).items()})
x = torch.ones(1, next(v for v in w.values() if v.dim() == 2).shape[1], device="cuda", dtype=torch.bfloat16)
(x @ next(v for v in w.values() if v.dim() == 2).T).sum().item()
print(round(time.time() - t, 3))
PY
}
export -f pytorch_big
restore_sweep() {  # restore the big model with several reader-thread and buffer sizes
  local threads piece addr
  for threads in ${SWEEP_THREADS:-4 8 16}; do
    for piece in ${SWEEP_PIECES_MIB:-1 2 4 16}; do
      addr=$(RUNNER_LOG=info,runner::setup=debug RUNNER_RESTORE_THREADS=$threads RUNNER_RESTORE_PIECE_MIB=$piece \
        serve big "$WORK/sweep-$threads-$piece.log" --require-snapshot) || return 1
      kill "$(cat "$WORK/sweep-$threads-$piece.log.pid")"
      echo "threads $threads, piece $piece MiB: $(grep -ho 'restored .*' "$WORK/sweep-$threads-$piece.log" | tail -1) | $(grep -ho 'cuda restore: .*' "$WORK/sweep-$threads-$piece.log" | tail -1)"
    done
  done | tee "$WORK/restore-sweep.txt"
}
export -f restore_sweep
step "bench big (pinned)" 150 bench big big pinned "$RUNS"
step "restore sweep (big)" 60 restore_sweep
step "PyTorch big cold start" 90 pytorch_big
step "bench MiniLM (pinned)" 90 bench minilm minilm pinned "$RUNS"
step "PyTorch MiniLM cold start" 90 pytorch_minilm
step "bench big (pageable)" 150 bench big-pageable big pageable 2
step "bench big (pinned, page cache dropped)" 150 bench big-dropped big pinned 2 --drop-caches

report() {
  python3 - "$WORK" > "$WORK/results.md" <<'PY'
import json, os, sys
w = sys.argv[1]
def text(name, default="not measured"):
    p = f"{w}/{name}"
    return open(p).read().strip() if os.path.exists(p) and open(p).read().strip() else default
h2d = text("pinned_h2d.txt", "")
print("| what | value |\n|---|---|")
print(f"| GPU | {text('gpu.txt')} ({text('cpus.txt')} CPUs) |")
print(f"| pinned H2D, PyTorch, 1 GiB x5 | {h2d or 'not measured'} GB/s |")
print(f"| PyTorch: sentence-transformers MiniLM import + load + first encode | {text('pytorch_minilm.txt')} s |")
print(f"| PyTorch: big model safetensors → cuda bf16 + one matmul | {text('pytorch_big.txt')} s |")
for name in ["minilm", "big", "big-pageable", "big-dropped"]:
    try:
        r = json.load(open(f"{w}/bench-{name}.json"))
    except Exception:
        print(f"| {name} | not measured |"); continue
    for m in r["modes"]:
        print(f"| {name}: {m['mode']} → ready / first prediction (median of {m['runs']}) | {m['ready_seconds']['median']:.3f} s / {m['first_prediction_seconds']['median']:.3f} s |")
    print(f"| {name}: snapshot speedup to first prediction, vs cold with the kernel cache warm | {r['speedup_first_prediction']:.2f}x |")
    if r.get('speedup_first_prediction_vs_fresh_machine'):
        print(f"| {name}: snapshot speedup to first prediction, vs cold on a fresh machine (empty kernel cache) | {r['speedup_first_prediction_vs_fresh_machine']:.2f}x |")
    if r.get('pinned_h2d_gb_per_s'):
        print(f"| {name}: pinned H2D measured by runner bench | {r['pinned_h2d_gb_per_s']:.1f} GB/s |")
    gbs = r['snapshot_restore_gb_per_s']
    vs = f"; {100 * gbs / float(h2d):.0f}% of pinned H2D" if h2d else ""
    print(f"| {name}: restore | {gbs:.2f} GB/s ({r['snapshot_data_bytes']/1e9:.2f} GB){vs}; page cache read {r.get('page_cache_read_gb_per_s', 0):.1f} GB/s |")
PY
}
report
{ echo; echo "failed steps: ${FAILED[*]:-none}"; } >> "$WORK/results.md"
[ -f "$WORK/restore-sweep.txt" ] && { echo; echo '```'; cat "$WORK/restore-sweep.txt"; echo '```'; } >> "$WORK/results.md"
cp "$WORK/results.md" "$OUT/"
cp "$WORK/correctness.txt" "$OUT/" 2>/dev/null
cp "$WORK"/bench-big.json "$WORK"/bench-minilm.json "$WORK"/big.svg "$OUT/" 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C "$WORK" .
cat "$OUT/results.md" "$OUT/correctness.txt" 2>/dev/null
