"""InputPromptMethod (prompt, soft prompt tuning, Lester et al.): P trainable embeddings at the input,
per task, initialised from token ids, a text, or random vocabulary embeddings.

On a causal stack the P prompt tokens precede every real token and see none of them, so each
layer's prompt K/V are a function of the prompt alone: computed once per forward by running the
frozen stack on the P prompt embeddings (once in all at inference, `FoldCache`) and used as that
layer's prefix. On a bidirectional stack the tokens are inserted ahead of layer 0 (insertion.py).
PEFT prompt-tuning adapters in and out on decoders.
"""

from __future__ import annotations

import torch

from .. import prompts as modules
from ..architectures import Stack
from ..back_references import weak_hook
from ..compat import output_cache
from ..insertion import install_insertion
from ..prompts import FoldCache
from .base import Method


def _embed_for_insertion(model, ids: torch.Tensor) -> torch.Tensor:
    """(P,) ids -> (P, hidden) in the space of the hidden states entering the first layer."""
    base = model.base_model
    with torch.no_grad():
        if hasattr(base, "embeddings"):  # BERT-like: word + position + type, LayerNorm
            was = base.embeddings.training
            base.embeddings.eval()
            out = base.embeddings(input_ids=ids[None])[0]
            base.embeddings.train(was)
            return out
        return model.get_input_embeddings()(ids)


class InputPromptMethod(Method):
    """Soft prompt tuning (Lester et al.): P embeddings at the input, per task."""

    name, peft_type = "prompt", "PROMPT_TUNING"
    input_layer_only = decoder_prompt_pass = True
    exclusive_fields = ("init_token_ids",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inserted = not self.stacks[0].causal  # encoders: tokens inserted; decoders: per-layer prompt K/V
        self._kv_cache = FoldCache()  # decoders, inference: every layer's prompt K/V, until the prompt changes

    def check(self):
        super().check()
        if self.config.peft_positions and not self.stacks[0].causal:
            raise ValueError("peft_positions applies to ptv2, and to input prompts on decoders (PEFT inserts encoder prompts before the embeddings)")

    @classmethod
    def shapes(cls, config, shape):
        return {"embedding": (config.num_tasks, config.num_tokens, shape.hidden)}

    def initial(self, num_tasks: int) -> torch.Tensor:
        """(T, P, hidden): each task's prompt from init_token_ids or random vocabulary embeddings
        (through the embedding layer's norm on encoders, where the prompt enters after it)."""
        model, config = self.model, self.config
        emb = model.get_input_embeddings()
        vocab = emb.weight.shape[0]
        p = config.num_tokens
        rows = []
        given = self.init_ids if self.init_ids is not None else config.init_token_ids
        for _ in range(num_tasks):
            if given is not None:
                ids = torch.as_tensor(list(given), dtype=torch.long)
                if ids.numel() == 0 or ids.min() < 0 or ids.max() >= vocab:
                    raise ValueError(f"init_token_ids must be non-empty token ids in [0, {vocab}), got {list(config.init_token_ids)}")
                ids = ids.repeat((p + ids.numel() - 1) // ids.numel())[:p]  # cycle, as PEFT does for short label words
            else:
                ids = torch.randint(0, vocab, (p,))
            ids = ids.to(emb.weight.device)
            with torch.no_grad():
                rows.append((_embed_for_insertion(model, ids) if self.inserted else emb(ids)).float())
        return torch.stack(rows)

    def build(self):
        return modules.SoftPrompt(self.initial(self.config.num_tasks))

    def new_task_row(self, key, old):
        return self.initial(1)  # vocabulary init, as at patch time

    def install(self, runtime):
        first = self.stacks[0]
        if not self.inserted:
            self._install_prompt_kv(runtime, first)
            return

        def make_tokens(runtime, hs, real, source):
            soft, ids = runtime.prompts, runtime.forward.prompt_ids
            if soft.num_tasks == 1 or ids is None:
                return soft.embedding[0][None].expand(hs.shape[0], -1, -1)
            return soft.embedding[ids.to(soft.embedding.device)]

        install_insertion(runtime, first, 0, self.config.num_tokens, make_tokens, first.rotary)

    def _install_prompt_kv(self, runtime, stack: Stack) -> None:
        for i, attn in enumerate(stack.self_attention):
            runtime.bind(attn, i)

        def prehook(runtime, module, args, kwargs):
            state = runtime.forward
            if state.computing:
                return None
            method, soft = runtime.method, runtime.prompts
            params = list(soft.parameters())
            ids = state.prompt_ids
            if torch.is_grad_enabled() and any(p.requires_grad for p in params) and ids is not None and soft.num_tasks > 1:
                # training: only the tasks present in the batch, ids re-indexed into them
                used, ids = torch.unique(ids, return_inverse=True)
                state.prompt_kv = (method.prompt_key_values(runtime, used), ids)
            else:
                state.prompt_kv = (method._kv_cache.get(params, None, lambda: method.prompt_key_values(runtime, None)), ids)
            return None

        # hooked on the stack's first layer (OPTForCausalLM calls model.decoder, never the base
        # model). Checkpointed layers get these K/V back for their recompute from a snapshot
        runtime.undo.hook(stack.layers[0].register_forward_pre_hook(weak_hook(runtime, prehook), with_kwargs=True))

    def prefix(self, runtime, slot, dtype, device):
        if self.inserted or runtime.forward.prompt_kv is None:
            return None
        kv, ids = runtime.forward.prompt_kv
        k, v = kv[slot]
        return self.choose(runtime, k.to(dtype), v.to(dtype), ids, device)

    def prompt_key_values(self, runtime, tasks):
        """Every layer's (K, V) of the prompts of `tasks` ((n,) ids, None = all), each (n, Hkv, P, D)."""
        model, base, soft = self.model, self.stacks[0].owner, runtime.prompts
        emb_w = model.get_input_embeddings().weight
        embeds = soft.embedding if tasks is None else soft.embedding[tasks]
        embeds = embeds.to(device=emb_w.device, dtype=emb_w.dtype if emb_w.is_floating_point() else torch.float32)
        n, p = embeds.shape[:2]
        # rotary models: prompt at positions -P..-1 so real tokens keep 0..T-1
        start = 0 if self.absolute_positions else -p
        pos = torch.arange(start, start + p, device=emb_w.device)[None].expand(n, -1)
        # transformers' gradient checkpointing (gradient_checkpointing_enable()) makes the stack turn
        # use_cache off in training; this P-token pass exists to fill a cache, and its layers run
        # unwrapped (truncation.py's bypass), so only the stack's own flag is in the way
        hf_checkpointing = getattr(base, "gradient_checkpointing", False)
        runtime.forward.computing = True
        base.gradient_checkpointing = False
        try:
            out = base(inputs_embeds=embeds, position_ids=pos, use_cache=True)
        finally:
            runtime.forward.computing = False
            base.gradient_checkpointing = hf_checkpointing
        cache = output_cache(out)
        return [(layer.keys, layer.values) for layer in cache.layers]

    def to_peft(self, prompts, task):
        if self.inserted:
            return super().to_peft(prompts, task)
        fields = {"token_dim": self.shape.hidden, "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
                  "tokenizer_name_or_path": None, "tokenizer_kwargs": None, "num_attention_heads": self.shape.heads}
        return prompts.embedding[task].detach(), fields

    def from_peft(self, prompts, embeddings):
        with torch.no_grad():
            prompts.embedding.copy_(embeddings[None])
