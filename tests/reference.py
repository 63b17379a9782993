"""An independent reference embedding: sentencepiece ids -> LukeModel (fp32) -> pooling.

It shares no code with the job: ids come from the sentencepiece file one text at a time,
the model runs one text at a time (so no padding), pooling is written out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch


def reference_ids(sp: spm.SentencePieceProcessor, text: str, max_length: int = 512) -> list[int]:
    """Fairseq ids: <s>=0, </s>=2, sp unk -> <unk>=3, every other piece id + 1; truncated."""
    ids = []
    for piece in sp.encode_as_pieces(text)[: max_length - 2]:
        pid = sp.piece_to_id(piece)
        ids.append(3 if pid == sp.unk_id() else pid + 1)
    return [0, *ids, 2]


def reference_embeddings(model_dir: Path, texts: list[str]) -> np.ndarray:
    from transformers import LukeModel

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "sentencepiece.bpe.model"))
    model = LukeModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    modules = json.loads((model_dir / "modules.json").read_text())
    out = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([reference_ids(sp, text)])
            hidden = model(input_ids=ids).last_hidden_state[0]
            if pooling.get("pooling_mode_cls_token"):
                v = hidden[0]
            elif pooling.get("pooling_mode_max_tokens"):
                v = hidden.max(dim=0).values
            else:
                v = hidden.mean(dim=0)
            if any(m["type"].endswith("Normalize") for m in modules):
                v = v / v.norm()
            out.append(v.numpy())
    return np.stack(out)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
