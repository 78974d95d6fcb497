"""What fastprompt knows about each supported transformers architecture: a spec per model_type
(ArchSpec) naming its layer stacks (Stack), the SUPPORTED list, and the refusal of the rest.

Each spec says where the layer stacks and their self-attention modules live, whether the
stacks are bidirectional, and how input-prompt tokens get positions. Anything not listed
here is refused by `patch`: many architectures accept a custom attention implementation and
then never call it (DeBERTa-v2 for one), which would train nothing and say nothing.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class Stack:
    """One stack of transformer layers: layers[i] holds self_attention[i].

    owner: the module whose forward takes the stack's (input_ids, attention_mask) and runs the
    layers, held weakly (it may be the model itself, BertModel say, which owns the runtime that
    holds its stacks: see back_references.py); rotary: its rotary embedding module, or None for
    absolute positions.
    """

    name: str
    layers: list[nn.Module]
    self_attention: list[nn.Module]
    causal: bool
    owner_ref: Callable[[], nn.Module | None]
    rotary: nn.Module | None = None

    @property
    def owner(self) -> nn.Module:
        return self.owner_ref()


@dataclass(frozen=True)
class ArchSpec:
    """How to find the layers of one model_type.

    stacks: the model's layer stacks (T5: encoder then decoder); absolute_positions: learned or
    sinusoidal position embeddings (input-prompt tokens then take positions 0..P-1 rather
    than -P..-1, which rotary models use so that real tokens keep 0..T-1).
    """

    model_type: str
    stacks: Callable[[nn.Module], list[Stack]]
    absolute_positions: bool


def _stack(name, layers, attn, causal, owner, rotary=None):
    layers = list(layers)
    return Stack(name, layers, [attn(layer) for layer in layers], causal, weakref.ref(owner), rotary)


def _bert_like(model):
    base = model.base_model
    return [_stack("encoder", base.encoder.layer, lambda l: l.attention.self, bool(model.config.is_decoder), base)]


def _distilbert(model):
    base = model.base_model
    return [_stack("transformer", base.transformer.layer, lambda l: l.attention, False, base)]


def _gpt2(model):
    base = model.base_model
    return [_stack("h", base.h, lambda l: l.attn, True, base)]


def _llama_like(model):
    base = model.base_model
    return [_stack("layers", base.layers, lambda l: l.self_attn, True, base, base.rotary_emb)]


def _opt(model):
    decoder = model.base_model.decoder  # OPTForCausalLM calls model.decoder directly
    return [_stack("decoder", decoder.layers, lambda l: l.self_attn, True, decoder)]


def _t5(model):
    # T5ForConditionalGeneration / T5Model / T5EncoderModel hold the stacks; T5ForSequenceClassification
    # and T5ForQuestionAnswering hold them in .transformer (their base model)
    owner = model if isinstance(getattr(model, "encoder", None), nn.Module) else model.base_model
    stacks = [_stack("encoder", owner.encoder.block, lambda b: b.layer[0].SelfAttention, False, owner.encoder)]
    if getattr(owner, "decoder", None) is not None:
        stacks.append(_stack("decoder", owner.decoder.block, lambda b: b.layer[0].SelfAttention, True, owner.decoder))
    return stacks


SPECS: dict[str, ArchSpec] = {
    "bert": ArchSpec("bert", _bert_like, True),
    "roberta": ArchSpec("roberta", _bert_like, True),
    "distilbert": ArchSpec("distilbert", _distilbert, True),
    "gpt2": ArchSpec("gpt2", _gpt2, True),
    "llama": ArchSpec("llama", _llama_like, False),
    "mistral": ArchSpec("mistral", _llama_like, False),
    "qwen2": ArchSpec("qwen2", _llama_like, False),
    "qwen3": ArchSpec("qwen3", _llama_like, False),
    "gemma": ArchSpec("gemma", _llama_like, False),
    "opt": ArchSpec("opt", _opt, True),
    "t5": ArchSpec("t5", _t5, False),
}

SUPPORTED = tuple(SPECS)


class UnsupportedModelError(ValueError):
    """The model's architecture does not route attention through fastprompt."""


def spec_for(model: nn.Module) -> ArchSpec:
    """The spec of a transformers model, or UnsupportedModelError naming it and the supported list."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SPECS:
        name = type(model).__name__
        raise UnsupportedModelError(
            f"fastprompt.patch: architecture {name} (model_type={model_type!r}) is not supported; "
            f"supported model types: {', '.join(SUPPORTED)}"
        )
    return SPECS[model_type]

