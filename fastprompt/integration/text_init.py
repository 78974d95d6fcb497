"""Starting a prompt from a text: its token ids, and a real prefill of it through the frozen model.

`init_text_ids` tokenizes `PromptConfig.init_text` (cut or repeated to num_tokens when that is given,
else num_tokens becomes the text's length). `prefill_key_values` runs the unpatched model once on
those ids with an attention function that records what every attention module sees: the keys and
values after the model's own projections, norms and rotary embedding, i.e. exactly what a KV cache
of the text would hold. P-Tuning v2 prefixes start from them, so that on a decoder the untrained
prompt is the text itself.
"""

from __future__ import annotations

import contextvars
import dataclasses

import torch
import torch.nn as nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CAPTURE_IMPLEMENTATION = "fastprompt_capture"
# the capture of the prefill running in this context (None: the function is plain SDPA)
_capture: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fastprompt_capture", default=None)


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' SDPA, recording key/value (B, Hkv, K, D) per attention module."""
    store = _capture.get()
    if store is not None:
        store[module] = (key.detach(), value.detach())
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _tokenizer_for(model: nn.Module, tokenizer):
    if tokenizer is not None:
        return tokenizer
    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    try:
        from transformers import AutoTokenizer

        if not name:
            raise OSError("the model was not loaded from a folder or hub id")
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ValueError(f"init_text needs the model's tokenizer: pass patch(model, init_text=..., tokenizer=tokenizer) "
                         f"(none could be loaded from {name!r}: {str(e).splitlines()[0]})") from None


def init_text_ids(model: nn.Module, config, tokenizer=None):
    """(config with num_tokens resolved, (P,) LongTensor of the text's ids or None without init_text)."""
    if config.init_text is None:
        return config, None
    tok = _tokenizer_for(model, tokenizer)
    ids = list(tok(config.init_text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"init_text {config.init_text!r} tokenizes to no tokens")
    p = config.num_tokens or len(ids)
    ids = (ids * (-(-p // len(ids))))[:p]  # cut, or repeated to P
    vocab = model.get_input_embeddings().weight.shape[0]
    if max(ids) >= vocab:
        raise ValueError(f"init_text: the tokenizer gave id {max(ids)}, past this model's vocabulary of {vocab}: is it the model's own tokenizer?")
    return dataclasses.replace(config, num_tokens=p), torch.tensor(ids, dtype=torch.long)


def prefill_key_values(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor | None = None) -> dict[nn.Module, tuple]:
    """Runs the (unpatched) model on ids (P,) without gradients; returns {attention module: (K, V)},
    each (Hkv, P, D) as that module's attention saw them. positions: (P,) position ids (rotary
    decoders: -P..-1, so that real tokens keep 0..T-1 after the prefix), None for the model's own."""
    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)
    previous, was_training = model.config._attn_implementation, model.training
    device = model.get_input_embeddings().weight.device
    kwargs = {"input_ids": ids[None].to(device)}
    if positions is not None:
        kwargs["position_ids"] = positions[None].to(device)
    if model.config.is_encoder_decoder:  # T5: the decoder's self-attention reads the text too
        kwargs["decoder_input_ids"] = kwargs["input_ids"]
    store: dict = {}
    token = _capture.set(store)
    model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    try:
        model.eval()
        with torch.no_grad():
            model(**kwargs)
    finally:
        _capture.reset(token)
        model.set_attn_implementation(previous)
        model.train(was_training)
    return {m: (k[0], v[0]) for m, (k, v) in store.items()}
