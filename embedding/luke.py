"""LUKE read with word inputs only, run as XLM-RoBERTa: the same computation, faster attention.

GLuCoSE is a ``LukeModel``. Without entity inputs a LUKE layer computes exactly what a RoBERTa
layer does: its entity-aware attention (``w2e``/``e2w``/``e2e`` queries) only applies to
entity tokens, and its embeddings are RoBERTa's (position ids counted from ``pad_token_id``).
Hugging Face's ``LukeModel`` has only eager attention; ``XLMRobertaModel`` has SDPA (fused
kernels, and on GPU the memory-efficient and flash paths). So the word-side weights are loaded
into an ``XLMRobertaModel`` with no renames; ``entity_embeddings.*``, the entity queries and the
pooler are dropped.

:func:`load_word_encoder` does this only where the config and the weights match what this
equivalence needs (see :func:`xlmr_config`), and returns ``None`` with the reason otherwise, so
the caller falls back to ``LukeModel``. ``tests/test_luke.py`` proves the equivalence in fp32
(≤ 1e-5 against ``LukeModel``) over padded batches of mixed lengths.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENTITY_PREFIXES = ("entity_embeddings.", "pooler.")
ENTITY_QUERIES = (".w2e_query.", ".e2w_query.", ".e2e_query.")
# LukeConfig fields copied as they are; any other field that changes the word path refuses.
COPIED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "initializer_range",
)


def xlmr_config(luke: dict, attn_implementation: str = "sdpa"):
    """An ``XLMRobertaConfig`` computing what ``luke`` (a LukeConfig as a dict) computes on words.

    Returns ``(config, None)``, or ``(None, reason)`` where the equivalence does not hold.
    """
    from transformers import XLMRobertaConfig

    if luke.get("model_type") != "luke":
        return None, f"model_type is {luke.get('model_type')!r}, not 'luke'"
    if luke.get("position_embedding_type", "absolute") != "absolute":
        return None, f"position_embedding_type {luke['position_embedding_type']!r} is not absolute"
    if luke.get("is_decoder") or luke.get("add_cross_attention"):
        return None, "a decoder LUKE is not a RoBERTa encoder"
    missing = [k for k in COPIED if k not in luke and k not in ("bos_token_id", "eos_token_id", "initializer_range")]
    if missing:
        return None, f"config lacks {missing}"
    cfg = XLMRobertaConfig(
        **{k: luke[k] for k in COPIED if k in luke},
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        position_embedding_type="absolute",
    )
    cfg._attn_implementation = attn_implementation
    return cfg, None


def word_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LukeModel weights minus everything entity-side and the pooler (unused by sentence pooling)."""
    return {
        k: v for k, v in state.items() if not k.startswith(ENTITY_PREFIXES) and not any(q in k for q in ENTITY_QUERIES)
    }


def load_word_encoder(path: str | Path, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """``XLMRobertaModel`` with LUKE's word weights from ``path``, or ``(None, reason)``.

    The key sets must match exactly (``strict`` loading): a weight this remap does not know about
    means a model it has not been proven on.
    """
    import json

    from safetensors.torch import load_file
    from transformers import XLMRobertaModel

    path = Path(path)
    config, reason = xlmr_config(json.loads((path / "config.json").read_text()), attn_implementation)
    if config is None:
        return None, reason
    state = word_state_dict(load_file(str(path / "model.safetensors")))
    model = XLMRobertaModel(config, add_pooling_layer=False)
    expected = set(model.state_dict())
    if set(state) != expected:
        extra, lacking = sorted(set(state) - expected), sorted(expected - set(state))
        return None, f"weights differ from XLM-R's word path (extra {extra[:3]}, missing {lacking[:3]})"
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval(), None
