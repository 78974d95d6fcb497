"""DeepPrefixMethod (ptv2, P-Tuning v2): a trainable key/value prefix in every self-attention layer
>= start_layer, optionally through the MLP reparameterisation; random, zero, or text-prefill start;
PEFT prefix-tuning adapters in and out."""

from __future__ import annotations

import torch

from .. import prompts as modules
from ..text_init import prefill_key_values
from .base import Method


class DeepPrefixMethod(Method):
    """P-Tuning v2: per-layer key/value prefixes (optionally through the MLP reparameterisation)."""

    name, peft_type = "ptv2", "PREFIX_TUNING"
    exclusive_fields = ("reparam", "prefix_init")

    @classmethod
    def validate(cls, config):
        super().validate(config)
        if config.init_text is not None and config.reparam:
            raise ValueError("init_text sets the prefix itself; with reparam=True the prefix is an MLP's output: use reparam=False")
        if config.init_text is not None and config.prefix_init != "random":
            raise ValueError(f"prefix_init={config.prefix_init!r} is for method='ptv2' without init_text")

    @staticmethod
    def _slots(config, shape) -> int:
        return sum(max(n - config.start_layer, 0) for n in shape.stack_layers)

    @classmethod
    def shapes(cls, config, shape):
        t, p, n_slots = config.num_tasks, config.num_tokens, cls._slots(config, shape)
        if not config.reparam:
            return {"prefix": (t, n_slots, 2, shape.kv_heads, p, shape.head_dim)}
        r, h = config.reparam_hidden, shape.hidden
        out = n_slots * 2 * shape.kv_heads * shape.head_dim
        return {"embedding": (t, p, h), "mlp.0.weight": (r, h), "mlp.0.bias": (r,), "mlp.2.weight": (out, r), "mlp.2.bias": (out,)}

    def build(self):
        c, s = self.config, self.shape
        prefix = modules.DeepPrefix(
            self._slots(c, s), s.kv_heads, c.num_tokens, s.head_dim, s.hidden,
            reparam=c.reparam, reparam_hidden=c.reparam_hidden, dropout=c.prefix_dropout, num_tasks=c.num_tasks,
        )
        if self.init_ids is not None:
            self._from_text(prefix)
        elif c.prefix_init == "zero":
            with torch.no_grad():
                for p in ([prefix.mlp[2].weight, prefix.mlp[2].bias] if c.reparam else [prefix.prefix]):
                    p.zero_()
        return prefix

    def _from_text(self, prefix) -> None:
        """Every task's prefix = the frozen model's keys and values of the init text, layer by layer."""
        first, p = self.stacks[0], self.init_ids.numel()
        # rotary decoders: the text at -P..-1, right before real tokens that keep 0..T-1 (with PEFT's
        # shift the real tokens start at P instead, so the text keeps 0..P-1)
        shifted = first.causal and first.rotary is not None and not self.config.peft_positions
        kv = prefill_key_values(self.model, self.init_ids, torch.arange(-p, 0) if shifted else None)
        attns = [a for s in self.stacks for i, a in enumerate(s.self_attention) if i >= self.config.start_layer]
        with torch.no_grad():
            for slot, attn in enumerate(attns):
                k, v = kv[attn]
                prefix.prefix[:, slot, 0] = k.to(prefix.prefix)
                prefix.prefix[:, slot, 1] = v.to(prefix.prefix)

    def install(self, runtime):
        slot = 0
        for s in self.stacks:
            for i, attn in enumerate(s.self_attention):
                if i >= self.config.start_layer:
                    runtime.bind(attn, slot)
                    slot += 1

    def prefix(self, runtime, slot, dtype, device):
        k, v = runtime.prompts.slot(slot, dtype, device)
        return self.choose(runtime, k, v, runtime.forward.prompt_ids, device)

    def _peft_layout(self):
        s = self.shape
        return self.config.num_tokens, s.stack_layers[0], s.kv_heads, s.head_dim

    def to_peft(self, prompts, task):
        if self.config.start_layer != 0:
            raise ValueError(f"PEFT prefixes cover every layer: start_layer must be 0, got {self.config.start_layer}")
        p, layers, hkv, dh = self._peft_layout()
        prefix = prompts.folded()[task].detach()  # (layers, 2, Hkv, P, D)
        emb = prefix.permute(3, 0, 1, 2, 4).reshape(p, layers * 2 * hkv * dh)
        return emb, {"token_dim": hkv * dh, "encoder_hidden_size": self.shape.hidden, "prefix_projection": False}

    def from_peft(self, prompts, embeddings):
        p, layers, hkv, dh = self._peft_layout()
        with torch.no_grad():
            prompts.prefix.copy_(embeddings.view(p, layers, 2, hkv, dh).permute(1, 2, 3, 0, 4)[None])
