#!/usr/bin/env bash
# Runs on the GPU machine (see prepare.sh): unpacks the CUDA binary, serves MiniLM on
# cuda:0, checks the embeddings against sentence-transformers' reference vectors, and
# times cold start against a PyTorch/sentence-transformers cold start in the same run.
# Writes $OUT/results.md. UNVERIFIED: no GPU run recorded yet.
set -euo pipefail
STAGE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/stage"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
cd "$STAGE"
python3 -c 'import lzma,shutil;shutil.copyfileobj(lzma.open("runner.xz"),open("runner","wb"))'
chmod +x runner
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s.%N)
./runner serve minilm --device cuda:0 --port 5077 2> "$OUT/serve.log" &
PID=$!
until grep -q "^runner: " "$OUT/serve.log"; do sleep 0.05; done
t1=$(date +%s.%N)
python3 - "$OUT" <<'PY'
import json, sys, urllib.request, math
out = sys.argv[1]
ref = json.load(open("minilm_reference.json"))
req = urllib.request.Request("http://127.0.0.1:5077/predictions", data=json.dumps({"input": {"text": ref["sentences"]}}).encode(), headers={"Content-Type": "application/json"})
got = json.load(urllib.request.urlopen(req))["output"]
cos = [sum(a*b for a, b in zip(g, w)) / math.sqrt(sum(a*a for a in g) * sum(b*b for b in w)) for g, w in zip(got, ref["normalized_full384"])]
open(f"{out}/correctness.txt", "w").write(f"cosine vs sentence-transformers: {cos}\n")
print(cos)
PY
kill $PID
t2=$(date +%s.%N)
python3 -c 'import time;t=time.time();from sentence_transformers import SentenceTransformer;m=SentenceTransformer("minilm/weights",device="cuda");m.encode(["warm up"]);print(time.time()-t)' > "$OUT/pytorch_cold.txt"
{
  echo "| what | seconds |"; echo "|---|---|"
  echo "| runner serve → ready (cuda:0) | $(python3 -c "print(round($t1-$t0,3))") |"
  echo "| sentence-transformers load + first encode (cuda) | $(cat "$OUT/pytorch_cold.txt") |"
} > "$OUT/results.md"
cat "$OUT/results.md" "$OUT/correctness.txt"
