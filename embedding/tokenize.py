"""CPU stage: text -> token ids, exactly the ids the model was trained with.

GLuCoSE (and every MLuke/XLM-R style model) was trained on fairseq ids over a sentencepiece
model: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3 and every other piece id + 1. We encode
with sentencepiece itself and apply that offset in numpy. We do not go through
``AutoTokenizer``: transformers 5 loads GLuCoSE's MLukeTokenizer without complaint but shifts
every id by one, and turns a literal ``[MASK]`` in the text into an id the model does not have.
Text is sentencepiece-normalised (NFKC) exactly as in training; a literal ``<mask>`` or
``[MASK]`` is ordinary text.

Models whose tokenizer is not sentencepiece-with-fairseq-offset use their Hugging Face fast
tokenizer, loaded from the model's own files without remote code.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedding import schema as S

FAIRSEQ_SPECIALS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
FAIRSEQ_OFFSET = 1


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything a tokenizer needs, small enough to ship to every CPU worker.

    ``kind`` is ``"sentencepiece-fairseq"`` or ``"hf"``; ``files`` holds the tokenizer files
    (name -> bytes) so workers never fetch the model.
    """

    kind: str
    max_length: int
    files: tuple[tuple[str, bytes], ...]
    bos_id: int = 0
    eos_id: int = 2
    pad_id: int = 1


class FairseqSentencePiece:
    """sentencepiece + the fairseq id offset, batched, ids as int32 arrays.

    Enormous texts are not tokenised whole: only a prefix of ``char_cap`` characters, enough
    for every one of the ``max_length`` tokens (pieces are at most ``max_piece`` characters
    after normalisation, which can at most triple-compose characters). When whitespace
    collapsing makes that prefix fall short of the limit plus a margin, the whole text is
    tokenised after all, so the ids are always those of the full text, truncated.
    """

    MARGIN = 16  # extra pieces past the cut, so the cut cannot change the kept ones

    def __init__(self, model_proto: bytes, max_length: int, threads: int = 1) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.unk_piece_id = self.sp.unk_id()
        self.max_length = max_length
        self.threads = threads
        self.name = "sentencepiece-fairseq"
        max_piece = max(len(self.sp.id_to_piece(i)) for i in range(self.sp.get_piece_size()))
        self.char_cap = (max_length + self.MARGIN) * max(max_piece, 1) * 3

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Texts -> ids with ``<s> ... </s>``, at most ``max_length`` ids each."""
        return self.encode_batch(texts)[0]

    def encode_batch(self, texts: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """Ids per text, and whether each text was cut at ``max_length``."""
        budget = self.max_length - 2
        capped = [t if len(t) <= self.char_cap else t[: self.char_cap] for t in texts]
        pieces = self.sp.encode(capped, num_threads=self.threads)
        for i, t in enumerate(texts):
            if len(t) > self.char_cap and len(pieces[i]) < budget + self.MARGIN:
                pieces[i] = self.sp.encode(t)
        out = []
        truncated = np.zeros(len(texts), dtype=bool)
        for i, p in enumerate(pieces):
            truncated[i] = len(p) > budget
            ids = np.empty(min(len(p), budget) + 2, dtype=np.int32)
            body = np.asarray(p[:budget], dtype=np.int32)
            # sentencepiece's own unk (piece 0) is fairseq's <unk>=3, not 0+1.
            ids[1:-1] = np.where(body == self.unk_piece_id, FAIRSEQ_SPECIALS["<unk>"], body + FAIRSEQ_OFFSET)
            ids[0] = FAIRSEQ_SPECIALS["<s>"]
            ids[-1] = FAIRSEQ_SPECIALS["</s>"]
            out.append(ids)
        return out, truncated


class HFTokenizer:
    """A model's own fast tokenizer, for non-fairseq sentence-transformers models."""

    def __init__(self, files: tuple[tuple[str, bytes], ...], max_length: int) -> None:
        from transformers import AutoTokenizer

        self._dir = tempfile.mkdtemp(prefix="embedding-tokenizer-")
        for name, data in files:
            path = os.path.join(self._dir, name)
            with open(path, "wb") as f:
                f.write(data)
        self.tok = AutoTokenizer.from_pretrained(self._dir, trust_remote_code=False)
        self.max_length = max_length
        self.name = f"hf:{type(self.tok).__name__}"

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return self.encode_batch(texts)[0]

    def encode_batch(self, texts: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
        enc = self.tok(
            texts, truncation=True, max_length=self.max_length, add_special_tokens=True, return_overflowing_tokens=False
        )
        ids = [np.asarray(i, dtype=np.int32) for i in enc["input_ids"]]
        # A text is cut when the tokenizer filled the limit; exact for texts that end at it too.
        return ids, np.array([len(i) >= self.max_length for i in ids], dtype=bool)


def load_tokenizer(spec: TokenizerSpec, threads: int = 1) -> FairseqSentencePiece | HFTokenizer:
    if spec.kind == "sentencepiece-fairseq":
        files = dict(spec.files)
        return FairseqSentencePiece(files["sentencepiece.bpe.model"], spec.max_length, threads)
    if spec.kind == "hf":
        return HFTokenizer(spec.files, spec.max_length)
    raise ValueError(f"unknown tokenizer kind {spec.kind!r}")


def ids_to_arrow(ids: list[np.ndarray]) -> pa.ListArray:
    """Ragged id arrays -> ``list<int32>`` without a Python loop over tokens."""
    lengths = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(ids) if ids else np.empty(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))


class Tokenize:
    """Stage: adds ``__input_ids`` (``list<int32>``) and ``__num_tokens`` to a batch.

    Rows already rejected (or empty-shard markers) get empty ids and 0 tokens.
    """

    def __init__(self, spec: TokenizerSpec, threads: int = 1) -> None:
        self.tokenizer = load_tokenizer(spec, threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        good = pc.and_(pc.is_null(batch[S.REJECT]), pc.invert(batch[S.MARKER])).to_numpy(zero_copy_only=False)
        texts = batch[S.TEXT].to_pylist()
        encoded, cut = self.tokenizer.encode_batch([t for t, ok in zip(texts, good, strict=True) if ok])
        empty = np.empty(0, np.int32)
        ids = [empty] * len(texts)
        truncated = np.zeros(len(texts), dtype=bool)
        for j, i in enumerate(np.flatnonzero(good)):
            ids[i] = encoded[j]
            truncated[i] = cut[j]
        arr = ids_to_arrow(ids)
        batch = batch.append_column(S.INPUT_IDS, arr)
        batch = batch.append_column(S.TRUNCATED, pa.array(truncated))
        return batch.append_column(S.NUM_TOKENS, pc.list_value_length(arr).cast(pa.int32()))
