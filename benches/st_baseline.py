#!/usr/bin/env python3
"""The PyTorch baseline for benches/throughput.py: sentence-transformers in-process on CPU
with 2 threads, over the same corpus. Prints one JSON line: sentences/s at batch 1 (one
sentence per call, the whole corpus) and at batch 32 (the corpus in batches of 32, best
of 3)."""
import json
import sys
import time

import torch
from sentence_transformers import SentenceTransformer

torch.set_num_threads(2)
model_dir, corpus_file = sys.argv[1], sys.argv[2]
sentences = [line.strip() for line in open(corpus_file) if line.strip()]
model = SentenceTransformer(model_dir, device="cpu")
model.encode(sentences[:32], batch_size=32)
start = time.perf_counter()
for s in sentences:
    model.encode(s)
batch1 = len(sentences) / (time.perf_counter() - start)
best = 0.0
for _ in range(3):
    start = time.perf_counter()
    model.encode(sentences, batch_size=32)
    best = max(best, len(sentences) / (time.perf_counter() - start))
print(json.dumps({"batch1_per_s": batch1, "batch32_per_s": best, "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "sentences": len(sentences)}))
