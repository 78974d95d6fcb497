"""ModelShape: the one description of a model's sizes that fastprompt uses everywhere: the method
classes size their prompts from it, saved prompts record its `fingerprint()` and are checked
against it, and the memory planner's formulas read it (with its parameter counts).

Built from a model (exact parameter counts, layer stacks as `architectures.py` finds them) or from
a config alone (a transformers config, a config dict, or a config.json folder / hub id; parameter
counts then estimated from the sizes)."""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from .heads import HEAD_NAMES

GATED = ("llama", "mistral", "qwen2", "qwen3", "gemma")
BERT_LIKE = ("bert", "roberta", "distilbert")
_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForMaskedLM")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A model's sizes.

    layers: the config's layer count (the first stack's); stack_layers: layers per stack (T5:
    encoder, decoder), from a config (layers,); head_dim: the per-head width (the config's head_dim
    or d_kv, else hidden // heads); lm_head: logits over the vocabulary rather than a small head.
    Parameter counts: quantisable (the layers' nn.Linear weights), other (everything else),
    linear_rows (output rows of those linears), head_params (the task head's).
    """

    model_type: str
    layers: int
    stack_layers: tuple[int, ...]
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    lm_head: bool
    quantisable: int
    other: int
    linear_rows: int
    head_params: int
    attention_dropout: float

    def fingerprint(self) -> dict:
        """The facts a saved prompt depends on (JSON: the key names are the save format's)."""
        return {
            "architecture": self.model_type,
            "layers": list(self.stack_layers),
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden,
        }


def _config_of(obj):
    if hasattr(obj, "config") and isinstance(obj, nn.Module):
        return obj.config
    if isinstance(obj, dict):
        from transformers import AutoConfig

        obj = dict(obj)
        return AutoConfig.for_model(obj.pop("model_type"), **obj)
    if isinstance(obj, str):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(obj)  # a config.json folder/file or a hub id
    return obj


def numel(p) -> int:
    """Logical elements of a parameter (bitsandbytes 4-bit parameters pack two values per byte)."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return int(shape.numel()) if shape is not None else p.numel()


def shape_of(model_or_config) -> ModelShape:
    """A model's ModelShape (parameters counted exactly), or a config's (counts from its sizes)."""
    c = _config_of(model_or_config)
    mt = c.model_type
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None) or getattr(c, "dim", None) or c.d_model
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None) or getattr(c, "n_layers", None) or c.num_layers
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None) or getattr(c, "n_heads", None) or c.num_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or getattr(c, "d_kv", None) or hidden // heads
    inter = (getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or getattr(c, "hidden_dim", None)
             or getattr(c, "ffn_dim", None) or getattr(c, "d_ff", None) or 4 * hidden)
    vocab = c.vocab_size
    is_lm = any(a.endswith(_LM_SUFFIXES) for a in (getattr(c, "architectures", None) or []))
    dropout = float(getattr(c, "attention_probs_dropout_prob", 0.0) or getattr(c, "attention_dropout", 0.0) or 0.0)
    sizes = dict(model_type=mt, layers=layers, hidden=hidden, heads=heads, kv_heads=kv, head_dim=head_dim, intermediate=inter,
                 vocab=vocab, attention_dropout=dropout)
    if isinstance(model_or_config, nn.Module):
        return _counted(model_or_config, sizes)
    q_out, kv_out = heads * head_dim, kv * head_dim
    attn = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    mlp = (3 if mt in GATED else 2) * hidden * inter
    rows = q_out + 2 * kv_out + hidden + ((2 * inter + hidden) if mt in GATED else (inter + hidden))
    quant = layers * (attn + mlp)
    labels = max(getattr(c, "num_labels", 2), 2)
    if mt in GATED:  # RMSNorms without bias; Qwen2 has q/k/v biases
        tied = getattr(c, "tie_word_embeddings", False)
        other = vocab * hidden * (1 if tied or not is_lm else 2) + layers * 2 * hidden + hidden
        other += layers * (q_out + 2 * kv_out) if mt == "qwen2" else 0
        head = 0 if is_lm else hidden * labels
    elif mt in BERT_LIKE:  # word/position/type embeddings and LayerNorm; per layer biases and two LayerNorms; pooler
        positions = getattr(c, "max_position_embeddings", 512)
        types = getattr(c, "type_vocab_size", 0) if mt != "distilbert" else 0
        other = (vocab + positions + types) * hidden + 2 * hidden
        other += layers * (q_out + 2 * kv_out + hidden + inter + hidden + 4 * hidden)
        other += 0 if mt == "distilbert" or is_lm else hidden * hidden + hidden
        head = 0 if is_lm else hidden * labels + labels
    else:  # GPT-2, OPT, T5 and others: an estimate (biases and LayerNorms per layer)
        other = vocab * hidden + layers * (4 * hidden + q_out + 2 * kv_out + hidden + inter + hidden) + 2 * hidden
        head = 0 if is_lm else hidden * labels
    return ModelShape(stack_layers=(layers,), lm_head=is_lm, quantisable=quant, other=other + head, linear_rows=layers * rows,
                      head_params=head, **sizes)


def _counted(model: nn.Module, sizes: dict) -> ModelShape:
    from .architectures import spec_for

    stacks = spec_for(model).stacks(model)
    quant, rows = 0, 0
    for layer in (l for s in stacks for l in s.layers):
        for m in layer.modules():
            if isinstance(m, nn.Linear) or type(m).__name__.startswith(("Linear8bit", "Linear4bit")):
                quant += m.in_features * m.out_features
                rows += m.out_features
    total = sum(numel(p) for p in model.parameters())
    head = sum(numel(p) for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module) for p in getattr(model, n).parameters())
    return ModelShape(stack_layers=tuple(len(s.layers) for s in stacks), lm_head=type(model).__name__.endswith(_LM_SUFFIXES),
                      quantisable=quant, other=total - quant, linear_rows=rows, head_params=head, **sizes)
