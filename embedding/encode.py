"""GPU/CPU actor: token ids -> sentence vectors. One model per actor, loaded once.

The encoder sorts the rows of each incoming window by length and cuts them into forward
passes under a token budget (padding included), runs the model in eval mode under
``torch.inference_mode``, pools as the model's ``1_Pooling`` config says (in float32), applies
``Normalize`` where the model has it, and puts each vector back on its own row.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from embedding import pooling
from embedding import schema as S
from embedding.batching import DEFAULT_BATCH_ROWS, DEFAULT_BATCH_TOKENS, token_budget_batches
from embedding.config import ATTENTIONS
from embedding.logs import error_line
from embedding.luke import Packing, WordEncoder, load_word_encoder, varlen_attention
from embedding.model import ModelSpec, materialize

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matrix multiplies run natively (about 3x fp32 with AMX)."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None off glibc."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Give freed heap pages back to the OS: glibc's arenas and Arrow's memory pool.

    Ray runs a stage in a worker thread, whose glibc arena keeps what each window freed: fed
    the windows of a 200,000-row corpus in such a thread, an encoder's heap passed 1.1 GB
    after 50 windows and kept growing; trimmed after each window it stayed at 750 MB."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    pa.default_memory_pool().release_unused()


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("`device` is 'cuda' but this worker sees no CUDA device")
    return requested


def resolve_dtype(requested: str, device: str) -> str:
    """``auto`` -> bfloat16 where the hardware runs it fast, float32 elsewhere."""
    if requested != "auto":
        return requested
    if device == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def probe_hardware(device: str, dtype: str) -> dict[str, str]:
    """What an encoder on this worker would run on; used by the driver before the run."""
    dev = resolve_device(device)
    return {"device": dev, "dtype": resolve_dtype(dtype, dev)}


class EncoderModel:
    """A sentence encoder: transformer + pooling (+ Normalize), on one device."""

    def __init__(
        self, spec: ModelSpec, device: str, dtype: str, *, remap_luke: bool = True, attention: str = "auto"
    ) -> None:
        path = materialize(spec)
        self.model = None
        if remap_luke and spec.model_type == "luke":
            # Same computation as LukeModel on word inputs, in plain torch (embedding/luke.py).
            self.model, why_not = load_word_encoder(path, TORCH_DTYPES[dtype])
            if self.model is None:
                logger.warning("running LukeModel with eager attention: %s", why_not)
        if self.model is None:
            from transformers import AutoConfig, AutoModel  # 2 s to import: only where needed

            config = AutoConfig.from_pretrained(path, trust_remote_code=False)
            self.model = AutoModel.from_pretrained(
                path,
                config=config,
                dtype=TORCH_DTYPES[dtype],
                use_safetensors=True,
                trust_remote_code=False,
            )
        self.model.eval().to(device)
        self.architecture = type(self.model).__name__
        self.spec = spec
        self.faults: dict = {}
        self.device = torch.device(device)
        self.dtype = dtype
        self.pad_id = spec.tokenizer.pad_id
        self.attention = self._choose_attention(attention)

    def _choose_attention(self, requested: str) -> str:
        """``"varlen"`` where variable-length attention runs here and checks out on this device
        (:func:`check_varlen`, now); ``"padded"`` otherwise. ``auto`` falls back with a warning
        on a GPU; ``varlen`` raises instead."""
        if requested not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}; got {requested!r}")
        if requested == "padded":
            return "padded"
        # The cheap reasons first: importing the kernel imports torch._dynamo (1.4 s of CPU in
        # every CPU actor's start-up, for a kernel that runs on CUDA only).
        attend = None
        if not isinstance(self.model, WordEncoder):
            why = f"{self.architecture} has padded attention only"
        elif self.device.type != "cuda":
            why = "variable-length (flash) attention runs on CUDA GPUs only"
        elif self.dtype not in ("bfloat16", "float16"):
            why = f"flash attention takes bfloat16 or float16, not {self.dtype}"
        elif (attend := varlen_attention()) is None:
            why = f"torch {torch.__version__} has no torch.nn.attention.varlen"
        else:
            why = check_varlen(self.model, attend, self.device)
        if why is None:
            self.model.varlen = attend
            return "varlen"
        if requested == "varlen":
            raise RuntimeError(f"attention 'varlen' is not available: {why}")
        if self.device.type == "cuda":
            logger.warning("padded attention: %s", why)
        return "padded"

    @torch.inference_mode()
    def embed_padded(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(batch, tokens) ids and mask -> (batch, dim) float32 vectors, on the model's device.

        Nothing here waits for the device, so the host pads the next batch while it computes.
        """
        mask_d = mask.to(self.device, non_blocking=True)
        packed = {"packing": Packing.of(mask).to(self.device)} if self.attention == "varlen" else {}
        out = self.model(input_ids=input_ids.to(self.device, non_blocking=True), attention_mask=mask_d, **packed)
        hidden = out if isinstance(out, torch.Tensor) else out.last_hidden_state
        vectors = pooling.pool(self.spec.pooling, hidden, mask_d)
        if self.spec.normalize:
            vectors = pooling.normalize(vectors)
        return vectors.float()

    def embed(
        self, ids: list[np.ndarray], max_tokens: int, max_rows: int
    ) -> tuple[np.ndarray, dict[int, str], np.ndarray]:
        """Ragged ids -> (len(ids), dim) float32 in the order given, {index: error} for texts
        that failed even alone, and the width (padding included) of the forward pass each text
        was embedded in (0 where it failed; its own length with variable-length attention):
        ``lengths.sum() / widths.sum()`` is the padding efficiency. A failing forward pass (out
        of memory on a huge batch, say) is split in halves and retried before any row is given
        up."""
        lengths = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))
        widths = np.zeros(len(ids), dtype=np.int64)
        try:
            return self._embed_window(ids, lengths, max_tokens, max_rows, widths), {}, widths
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            logger.warning("a forward pass failed (%s); redoing the window batch by batch", str(e).splitlines()[0])
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        out = np.zeros((len(ids), self.spec.dim), dtype=np.float32)
        widths[:] = 0
        failed: dict[int, str] = {}
        for group in token_budget_batches(lengths, max_tokens, max_rows):
            self._embed_group(ids, lengths, group, out, failed, widths)
        return out, failed, widths

    def _padded(
        self, ids: list[np.ndarray], lengths: np.ndarray, group: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        width = int(lengths[group].max())
        padded = np.full((len(group), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(group), width), dtype=np.int64)
        for j, i in enumerate(group):
            padded[j, : lengths[i]] = ids[i]
            mask[j, : lengths[i]] = 1
        return torch.from_numpy(padded), torch.from_numpy(mask)

    def _width(self, lengths: np.ndarray, group: np.ndarray) -> np.ndarray | int:
        """Tokens each text of ``group`` was computed with: the pass's width where attention is
        padded, its own length where it is variable-length (no padding computed)."""
        return lengths[group] if self.attention == "varlen" else int(lengths[group].max())

    def _embed_window(
        self, ids: list[np.ndarray], lengths: np.ndarray, max_tokens: int, max_rows: int, widths: np.ndarray
    ) -> np.ndarray:
        """The fast path: every batch queued on the device, one copy back for the window."""
        out = np.empty((len(ids), self.spec.dim), dtype=np.float32)
        groups, pending = token_budget_batches(lengths, max_tokens, max_rows), []
        for group in groups:
            if self.faults:
                self._inject(group, lengths)
            pending.append(self.embed_padded(*self._padded(ids, lengths, group)))
            widths[group] = self._width(lengths, group)
        if pending:
            # One copy back per window: the only point where the host waits for the device.
            out[np.concatenate(groups)] = torch.cat(pending).cpu().numpy()
        return out

    def _embed_group(
        self,
        ids: list[np.ndarray],
        lengths: np.ndarray,
        group: np.ndarray,
        out: np.ndarray,
        failed: dict[int, str],
        widths: np.ndarray,
    ) -> None:
        """The careful path: one batch at a time, split in halves on failure down to single rows."""
        try:
            if self.faults:
                self._inject(group, lengths)
            out[group] = self.embed_padded(*self._padded(ids, lengths, group)).cpu().numpy()
            widths[group] = self._width(lengths, group)
        except (RuntimeError, MemoryError) as e:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(group) == 1:
                failed[int(group[0])] = error_line(e, 500)
                return
            half = len(group) // 2
            self._embed_group(ids, lengths, group[:half], out, failed, widths)
            self._embed_group(ids, lengths, group[half:], out, failed, widths)

    def _inject(self, group: np.ndarray, lengths: np.ndarray) -> None:
        """Test-only faults (``fault_injection`` setting): simulated OOM and poisoned rows."""
        if len(group) > self.faults.get("oom_over_rows", 1 << 30):
            raise RuntimeError("CUDA out of memory (injected)")
        if self.faults.get("poison_length") in lengths[group].tolist():
            raise RuntimeError("poisoned row (injected)")


@torch.inference_mode()
def check_varlen(model: WordEncoder, attend, device: torch.device, min_cosine: float = 0.999) -> str | None:
    """None where ``attend`` (variable-length attention) computes on ``device``, in the model's
    dtype, head shape and scale, each packed text's own attention: every (token, head) output
    within ``min_cosine`` of float32 attention done text by text, all finite. Otherwise why not
    (the error it raised, or how far apart). Four texts of 3 to 130 tokens, random q, k, v."""
    layer = model.layers[0]
    dtype = layer.qkv.weight.dtype
    lengths = [3, 17, 64, 130]
    starts = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, int(starts[-1]), layer.heads, layer.head_size, generator=g)
    if layer.query_scaled:  # the model's queries come scaled and it passes scale 1
        qkv[0] /= layer.head_size**0.5
    q, k, v = qkv.to(dtype).float().unbind(0)  # the inputs as the kernel sees them
    scale = layer.kernel_scale or 1 / layer.head_size**0.5
    want = torch.empty_like(q)
    for a, b in itertools.pairwise(starts.tolist()):
        weights = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * scale, dim=-1)
        want[a:b] = torch.einsum("hqk,khd->qhd", weights, v[a:b])
    try:
        on = [x.to(device, dtype) for x in (q, k, v)]
        s = starts.to(device)
        got = attend(*on, s, s, max(lengths), max(lengths), scale=layer.kernel_scale).float().cpu()
    except Exception as e:  # any failure means: not here
        return error_line(e, 300)
    if not torch.isfinite(got).all():
        return "it gave non-finite values"
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item()
    return None if cos >= min_cosine else f"its outputs differ from each text's own attention (cosine {cos:.4f})"


def vectors_to_arrow(vectors: np.ndarray, valid: np.ndarray, output_dtype: str) -> pa.FixedSizeListArray:
    """(n, dim) float32 -> ``fixed_size_list<output_dtype>[dim]``, null where not ``valid``."""
    n, dim = vectors.shape
    values = vectors.astype(np.float16 if output_dtype == "float16" else np.float32, copy=False)
    flat = pa.array(values.reshape(-1), type=S.VALUE_TYPES[output_dtype])
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~valid))


class Encode:
    """Ray actor stage: ``__input_ids`` -> ``embedding``. Drops the ids and the text."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
        batch_tokens: int | None = None,
        batch_rows: int | None = None,
        output_dtype: str = "float32",
        attention: str = "auto",
        fault_injection: dict | None = None,
    ) -> None:
        faults = dict(fault_injection or {})
        self.faults = faults
        self.device = resolve_device(device)
        if self.device == "cpu":
            # oneDNN caches a primitive per matrix shape, up to 1,024 of them; batches of every
            # length make nearly every shape new, so the cache only held memory (270 MB an
            # actor on a 200,000-row run) and gave no measurable speed. Read at first use.
            os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
            # Ray sets OMP_NUM_THREADS=1 in workers; size the pool to the actor's CPUs instead.
            torch.set_num_threads(threads or max(1, int(os.environ.get("EMBEDDING_THREADS", "1"))))
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = EncoderModel(spec, self.device, self.dtype, attention=attention)
        self.model.faults = {k: v for k, v in faults.items() if k in ("oom_over_rows", "poison_length")}
        self.batch_tokens = max(batch_tokens or DEFAULT_BATCH_TOKENS[self.device], spec.max_length)
        self.batch_rows = batch_rows or DEFAULT_BATCH_ROWS[self.device]
        self.output_dtype = output_dtype
        logger.info(
            "encoder ready: %s on %s in %s, %s attention, %d threads",
            spec.source,
            self.device,
            self.dtype,
            self.model.attention,
            torch.get_num_threads(),
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        crash_flag = self.faults.get("crash_once_flag")
        if crash_flag and not os.path.exists(crash_flag):  # test-only: the actor dies mid-batch
            open(crash_flag, "w").close()
            os._exit(1)
        valid = pc.greater(batch[S.NUM_TOKENS], 0).to_numpy(zero_copy_only=False)
        all_ids = batch[S.INPUT_IDS].combine_chunks()
        offsets = all_ids.offsets.to_numpy()
        flat = all_ids.values.to_numpy()
        rows = np.flatnonzero(valid)
        ids = [flat[offsets[i] : offsets[i + 1]] for i in rows]
        vectors = np.zeros((batch.num_rows, self.model.spec.dim), dtype=np.float32)
        widths = np.zeros(batch.num_rows, dtype=np.int32)
        rejects = batch[S.REJECT]
        if len(ids):
            embedded, failed, row_widths = self.model.embed(ids, self.batch_tokens, self.batch_rows)
            vectors[rows] = embedded
            widths[rows] = row_widths
            if failed:
                reasons = rejects.to_pylist()
                for j, message in failed.items():
                    valid[rows[j]] = False
                    reasons[rows[j]] = f"encode_error: {message}"
                rejects = pa.array(reasons, pa.string())
                batch = batch.set_column(batch.schema.get_field_index(S.REJECT), S.REJECT, rejects)
        # The text rides on only where a rejected row needs it for the quarantine.
        text = pc.if_else(pc.is_null(rejects), pa.scalar(None, pa.string()), batch[S.TEXT])
        batch = batch.drop_columns([S.INPUT_IDS, S.TEXT]).append_column(S.TEXT, text)
        batch = batch.append_column(S.EMBEDDING, vectors_to_arrow(vectors, valid, self.output_dtype))
        batch = batch.append_column(S.PASS_WIDTH, pa.array(widths, pa.int32()))
        del ids, all_ids, flat
        trim_heap()
        return batch
