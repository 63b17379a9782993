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

Passages (``--chunk``): a long text is cut into windows of at most ``tokens`` ids, specials
included, over the model's own pieces, consecutive windows sharing ``overlap`` pieces. Each
window is embedded from its own ids (``<s>`` + its pieces + ``</s>``), and carries the
character span of its pieces in the *original* text (sentencepiece reports every piece's byte
span in the original, before normalisation), so ``text[char_start:char_end]`` is what it
covers. The spans of a text's passages cover all of it, from 0 to ``len(text)``.
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


@dataclass(frozen=True)
class ChunkSpec:
    """Passages of at most ``tokens`` ids (specials included); neighbours share ``overlap`` pieces."""

    tokens: int
    overlap: int

    def __post_init__(self) -> None:
        if self.tokens < 3:
            raise ValueError(f"`chunk_tokens` must be at least 3 (two specials and one piece); got {self.tokens}")
        if not 0 <= self.overlap < self.tokens - 2:
            raise ValueError(
                f"`chunk_overlap` must be ≥ 0 and smaller than `chunk_tokens` - 2 = {self.tokens - 2} pieces "
                f"(a passage must advance); got {self.overlap}"
            )


@dataclass(frozen=True)
class Passages:
    """One text's passages: ids with specials, and ``[char_start, char_end)`` in the original text."""

    ids: list[np.ndarray]
    char_start: np.ndarray  # int64, one per passage
    char_end: np.ndarray


def token_windows(n: int, body: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, end)`` piece windows of at most ``body`` pieces covering ``range(n)``.

    Consecutive windows share ``overlap`` pieces; the last one ends at ``n``. An empty text
    has one empty window.
    """
    stride = body - overlap
    windows = [(0, min(n, body))]
    while windows[-1][1] < n:
        start = windows[-1][0] + stride
        windows.append((start, min(n, start + body)))
    return windows


def byte_to_char(text: str) -> np.ndarray:
    """``out[b]`` = index of the character starting at UTF-8 byte ``b`` (``len(out)`` = bytes + 1)."""
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    out = np.zeros(len(raw) + 1, dtype=np.int64)
    np.cumsum((raw & 0xC0) != 0x80, out=out[1:])  # continuation bytes are 10xxxxxx
    return out


def passage_spans(
    windows: list[tuple[int, int]], begins: np.ndarray, ends: np.ndarray, text_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Character spans of piece windows, widened so that together they cover ``[0, text_length)``.

    A window spans from its first piece's start to its last piece's end. Where normalisation
    expands one character into several pieces (``℃`` -> ``°`` ``C``), sentencepiece gives the
    character to the last of them and an empty span to the others; such a piece ends where the
    next non-empty piece ends, so a passage holding it holds the whole character. The first passage
    starts at 0 and the last ends at the text's end (leading and trailing whitespace has no
    piece of its own); a passage also reaches the next one's start, so characters that
    normalisation dropped between two pieces stay covered.
    """
    begins, ends = np.asarray(begins, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    n = len(ends)
    own = np.where(ends > begins, np.arange(n), n)
    nxt = np.minimum.accumulate(own[::-1])[::-1]  # index of the next non-empty piece, n if none
    ends = np.where(nxt < n, np.append(ends, text_length)[nxt], text_length)
    starts = np.array([begins[s] if e > s else 0 for s, e in windows], dtype=np.int64)
    stops = np.array([ends[e - 1] if e > s else text_length for s, e in windows], dtype=np.int64)
    starts[0] = 0
    stops[-1] = text_length
    stops[:-1] = np.maximum(stops[:-1], starts[1:])
    return starts, stops


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

    def encode_passages(self, texts: list[str], chunk: ChunkSpec) -> list[Passages]:
        """Texts -> passages of at most ``chunk.tokens`` ids each, with character spans."""
        body = chunk.tokens - 2
        out = []
        for text, proto in zip(
            texts, self.sp.encode(texts, return_type="proto", num_threads=self.threads), strict=True
        ):
            n = len(proto.pieces)
            pieces = np.fromiter((p.id for p in proto.pieces), dtype=np.int32, count=n)
            b2c = byte_to_char(text)
            begins = b2c[np.fromiter((p.begin for p in proto.pieces), dtype=np.int64, count=n)]
            ends = b2c[np.fromiter((p.end for p in proto.pieces), dtype=np.int64, count=n)]
            mapped = np.where(pieces == self.unk_piece_id, FAIRSEQ_SPECIALS["<unk>"], pieces + FAIRSEQ_OFFSET)
            windows = token_windows(n, body, chunk.overlap)
            ids = []
            for s, e in windows:
                one = np.empty(e - s + 2, dtype=np.int32)
                one[0], one[-1] = FAIRSEQ_SPECIALS["<s>"], FAIRSEQ_SPECIALS["</s>"]
                one[1:-1] = mapped[s:e]
                ids.append(one)
            starts, stops = passage_spans(windows, begins, ends, len(text))
            out.append(Passages(ids, starts, stops))
        return out


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

    def encode_passages(self, texts: list[str], chunk: ChunkSpec) -> list[Passages]:
        """As :meth:`FairseqSentencePiece.encode_passages`, with the fast tokenizer's offsets."""
        if not getattr(self.tok, "is_fast", False):
            raise ValueError(f"passages need character offsets, which {self.name} (not a fast tokenizer) lacks")
        body = chunk.tokens - self.tok.num_special_tokens_to_add(pair=False)
        if body <= chunk.overlap:
            raise ValueError(f"`chunk_tokens` {chunk.tokens} leaves {body} tokens after the specials; too few")
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for text, pieces, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True):
            offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            windows = token_windows(len(pieces), body, chunk.overlap)
            ids = [np.asarray(self.tok.build_inputs_with_special_tokens(pieces[s:e]), np.int32) for s, e in windows]
            starts, stops = passage_spans(windows, offs[:, 0], offs[:, 1], len(text))
            out.append(Passages(ids, starts, stops))
        return out


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

    Rows already rejected (or empty-shard markers) get empty ids and 0 tokens. With ``chunk``,
    each good row becomes one row per passage, with ``passage``, ``char_start``, ``char_end``
    and ``__passages`` (the document's passage count); ``__text`` is then dropped from good
    rows (it is only needed for rejected ones). With ``keep_text``, the output ``text`` column
    holds each row's text (the passage's span of it when chunking).
    """

    def __init__(
        self, spec: TokenizerSpec, threads: int = 1, chunk: ChunkSpec | None = None, keep_text: bool = False
    ) -> None:
        self.tokenizer = load_tokenizer(spec, threads)
        self.chunk = chunk
        self.keep_text = keep_text

    def __call__(self, batch: pa.Table) -> pa.Table:
        good = pc.and_(pc.is_null(batch[S.REJECT]), pc.invert(batch[S.MARKER])).to_numpy(zero_copy_only=False)
        texts = batch[S.TEXT].to_pylist()
        if self.chunk is not None:
            return self._passages(batch, good, texts)
        encoded, cut = self.tokenizer.encode_batch([t for t, ok in zip(texts, good, strict=True) if ok])
        empty = np.empty(0, np.int32)
        ids = [empty] * len(texts)
        truncated = np.zeros(len(texts), dtype=bool)
        for j, i in enumerate(np.flatnonzero(good)):
            ids[i] = encoded[j]
            truncated[i] = cut[j]
        arr = ids_to_arrow(ids)
        if self.keep_text:
            batch = batch.append_column(
                S.TEXT_OUT, pc.if_else(pa.array(good), batch[S.TEXT], pa.scalar(None, pa.string()))
            )
        batch = batch.append_column(S.INPUT_IDS, arr)
        batch = batch.append_column(S.TRUNCATED, pa.array(truncated))
        return batch.append_column(S.NUM_TOKENS, pc.list_value_length(arr).cast(pa.int32()))

    def _passages(self, batch: pa.Table, good: np.ndarray, texts: list[str | None]) -> pa.Table:
        encoded = iter(self.tokenizer.encode_passages([t for t, ok in zip(texts, good, strict=True) if ok], self.chunk))
        take, ids, passage, count, starts, stops, spans = [], [], [], [], [], [], []
        empty = np.empty(0, np.int32)
        for i, ok in enumerate(good):
            if not ok:
                take.append(i)
                ids.append(empty)
                passage.append(0)
                count.append(1)
                starts.append(0)
                stops.append(0)
                spans.append(None)
                continue
            p = next(encoded)
            n = len(p.ids)
            take.extend([i] * n)
            ids.extend(p.ids)
            passage.extend(range(n))
            count.extend([n] * n)
            starts.extend(p.char_start.tolist())
            stops.extend(p.char_end.tolist())
            if self.keep_text:
                spans.extend(texts[i][s:e] for s, e in zip(p.char_start.tolist(), p.char_end.tolist(), strict=True))
        out = batch.take(pa.array(take, pa.int64()))
        if S.STORAGE_ERRORS in out.column_names:  # a count, not a value: keep it on passage 0 only
            first = pa.array(np.asarray(passage) == 0)
            out = out.set_column(
                out.column_names.index(S.STORAGE_ERRORS),
                S.STORAGE_ERRORS,
                pc.if_else(first, out[S.STORAGE_ERRORS], pa.scalar(0, pa.int64())),
            )
        # Good rows' full text is not needed past here; repeating it per passage would cost memory.
        keep = pa.array(np.asarray(good)[take])
        out = out.set_column(
            out.column_names.index(S.TEXT), S.TEXT, pc.if_else(keep, pa.scalar(None, pa.string()), out[S.TEXT])
        )
        out = out.append_column(S.PASSAGE, pa.array(passage, pa.int32()))
        out = out.append_column(S.PASSAGES, pa.array(count, pa.int32()))
        out = out.append_column(S.CHAR_START, pa.array(starts, pa.int64()))
        out = out.append_column(S.CHAR_END, pa.array(stops, pa.int64()))
        if self.keep_text:
            out = out.append_column(S.TEXT_OUT, pa.array(spans, pa.string()))
        arr = ids_to_arrow(ids)
        out = out.append_column(S.INPUT_IDS, arr)
        out = out.append_column(S.TRUNCATED, pa.array(np.zeros(len(ids), dtype=bool)))  # passages cover all
        return out.append_column(S.NUM_TOKENS, pc.list_value_length(arr).cast(pa.int32()))
