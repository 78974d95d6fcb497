"""Installing prompts into a transformers model and removing them again.

Everything enters through the registered attention function (never `past_key_values`):
- deep prefixes (ptv2): every self-attention layer >= start_layer gets a K/V prefix slot;
- input prompts on a causal stack: the P prompt tokens come before every real token and see
  none of them, so each layer's prompt K/V are a function of the prompt alone. They are
  computed once per forward by running the frozen stack on the P prompt embeddings (once in
  all at inference) and then used as that layer's prefix: identical to prepending the prompt
  at the input, the KV cache holds real tokens only and generate() needs nothing special;
- input prompts on a bidirectional stack (BERT, T5's encoder) and Late Prompt Tuning: tokens
  inserted into the hidden states ahead of a layer (see insertion.py).
Layers below the first prompted layer run without autograd; with checkpointing, the layers
that do build a graph are recomputed in backward (see truncation.py). Quantised (bitsandbytes)
backbones need one fix-up: 4-bit layers must not repack their weights for CPU inference.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from . import attention
from .architectures import Stack, UnsupportedModelError, fingerprint, spec_for
from .insertion import install_insertion
from .prompts import DeepPrefix, FoldCache, LatePromptGenerator, SoftPrompt
from .truncation import install_truncation, remove_truncation

PROMPT_MODULE = "fastprompt"
HEAD_NAMES = ("classifier", "score", "qa_outputs")


class PromptRuntime:
    """Per-model state the attention function reads: the prompt module and per-forward values."""

    def __init__(self, model, config, stacks: list[Stack], prompts: nn.Module, mode: str):
        self.config = config
        self.stacks = stacks
        self.prompts = prompts
        self.mode = mode  # "prefix" | "prompt_kv" | "insert"
        self.computing = False
        self.prompt_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.inserted_in_flight = 0
        self.mask2d: torch.Tensor | None = None
        self.handles: list = []
        self.wrapped_forwards: list = []
        self.bnb_cpu_packing: list = []
        self.bound: list[nn.Module] = []
        self.requires_grad: dict[str, bool] = {}
        self.attn_implementation = model.config._attn_implementation
        self.head_names: list[str] = []
        self._kv_cache = FoldCache()

    def prefix(self, slot, dtype, device):
        """(K, V) each (Hkv, P, D) for a slot, or None when this call adds no prefix."""
        if slot is None or self.computing:
            return None
        if self.mode == "prefix":
            return self.prompts.slot(slot, dtype, device)
        if self.mode == "prompt_kv" and self.prompt_kv is not None:
            k, v = self.prompt_kv[slot]
            return k.to(dtype), v.to(dtype)
        return None


def _head_modules(model, config) -> list[tuple[str, nn.Module]]:
    names = [config.head] if config.head else list(HEAD_NAMES)
    found = [(n, getattr(model, n)) for n in names if isinstance(getattr(model, n, None), nn.Module)]
    if config.head and not found:
        raise ValueError(f"head={config.head!r}: the model has no submodule of that name")
    return found


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


def _prompt_init(model, config, insert: bool) -> torch.Tensor:
    emb = model.get_input_embeddings()
    vocab = emb.weight.shape[0]
    p = config.num_tokens
    if config.init_token_ids is not None:
        ids = torch.as_tensor(list(config.init_token_ids), dtype=torch.long)
        if ids.numel() == 0 or ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"init_token_ids must be non-empty token ids in [0, {vocab}), got {list(config.init_token_ids)}")
        ids = ids.repeat((p + ids.numel() - 1) // ids.numel())[:p]  # cycle, as PEFT does for short label words
    else:
        ids = torch.randint(0, vocab, (p,))
    ids = ids.to(emb.weight.device)
    with torch.no_grad():
        return (_embed_for_insertion(model, ids) if insert else emb(ids)).float()


def _bind(runtime, module, slot, inserted=0, causal=False):
    # a plain attribute, not a submodule: the model's state_dict and module tree stay as they were
    module.__dict__["_fastprompt"] = attention.Binding(runtime, slot, inserted, causal)
    runtime.bound.append(module)


def _capture_mask(runtime, stack: Stack) -> None:
    """Keeps the (B, T) padding mask the stack's owner is called with, for the inserted tokens."""

    def prehook(module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        runtime.mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        runtime.inserted_in_flight = 0  # a forward that raised midway leaves nothing behind
        return None

    runtime.handles.append(stack.owner.register_forward_pre_hook(prehook, with_kwargs=True))


def _install_prompt_kv(model, runtime, stack: Stack, absolute_positions: bool):
    base = stack.owner
    for i, attn in enumerate(stack.self_attention):
        _bind(runtime, attn, i)
    soft = runtime.prompts

    def compute():
        emb_w = model.get_input_embeddings().weight
        embeds = soft.embedding.to(device=emb_w.device, dtype=emb_w.dtype if emb_w.is_floating_point() else torch.float32)
        p = embeds.shape[0]
        # rotary models: prompt at positions -P..-1 so real tokens keep 0..T-1
        start = 0 if absolute_positions else -p
        pos = torch.arange(start, start + p, device=emb_w.device)[None]
        runtime.computing = True
        try:
            out = base(inputs_embeds=embeds[None], position_ids=pos, use_cache=True)
        finally:
            runtime.computing = False
        cache = out.past_key_values
        return [(layer.keys[0], layer.values[0]) for layer in cache.layers]

    def prehook(module, args, kwargs):
        if runtime.computing:
            return None
        runtime.prompt_kv = runtime._kv_cache.get(list(soft.parameters()), None, compute)
        return None

    # hooked on the stack's first layer (OPTForCausalLM calls model.decoder, never the base
    # model). The K/V stay until the next forward replaces them: a checkpointed layer's
    # recompute in backward reads them again
    runtime.handles.append(stack.layers[0].register_forward_pre_hook(prehook, with_kwargs=True))


def _probe(model, runtime) -> None:
    """One tiny no-grad forward: every bound module must have been called through our function."""
    params = inspect.signature(model.forward).parameters
    device = next(model.parameters()).device
    inputs = {"input_ids": torch.tensor([[1, 2, 3]], device=device)}
    if "decoder_input_ids" in params:
        inputs["decoder_input_ids"] = torch.tensor([[0]], device=device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        model.train(was)
    silent = [m for m in runtime.bound if m.__dict__["_fastprompt"].calls == 0]
    if silent:
        raise UnsupportedModelError(
            f"fastprompt.patch: {type(model).__name__} did not call the registered attention function in "
            f"{len(silent)} of {len(runtime.bound)} self-attention modules ({type(silent[0]).__name__}); "
            "this architecture does not route attention through transformers' AttentionInterface"
        )


def prompt_shapes(model: nn.Module, config) -> dict[str, tuple[int, ...]]:
    """The state_dict shapes of the prompt module `install` would build, without building it."""
    stacks = spec_for(model).stacks(model)
    fp = fingerprint(model)
    p, h = config.num_tokens, fp["hidden_size"]
    if config.method == "prompt":
        return {"embedding": (p, h)}
    if config.method == "lpt":
        r = config.generator_hidden
        up = p * h if config.generator == "npg" else h
        return {"down.weight": (r, h), "down.bias": (r,), "up.weight": (up, r), "up.bias": (up,)}
    n_slots = sum(max(len(s.layers) - config.start_layer, 0) for s in stacks)
    if not config.reparam:
        return {"prefix": (n_slots, 2, fp["kv_heads"], p, fp["head_dim"])}
    r = config.reparam_hidden
    out = n_slots * 2 * fp["kv_heads"] * fp["head_dim"]
    return {"embedding": (p, h), "mlp.0.weight": (r, h), "mlp.0.bias": (r,), "mlp.2.weight": (out, r), "mlp.2.bias": (out,)}


def head_shapes(model: nn.Module, config) -> dict[str, tuple[int, ...]]:
    """name -> shape of the head parameters `install` would make trainable, keyed '<head>.<param>'."""
    if not config.train_head:
        return {}
    return {f"{n}.{k}": tuple(v.shape) for n, m in _head_modules(model, config) for k, v in m.state_dict().items()}


def install(model: nn.Module, config) -> PromptRuntime:
    """Adds prompts to `model` in place per `config` (a PromptConfig); returns the runtime."""
    spec = spec_for(model)
    stacks = spec.stacks(model)
    fp = fingerprint(model)
    n_layers = min(len(s.layers) for s in stacks)
    if not 0 <= config.start_layer < n_layers:
        raise ValueError(f"start_layer must be in [0, {n_layers}) for this model, got {config.start_layer}")

    if config.method == "ptv2":
        n_slots = sum(len(s.layers) - config.start_layer for s in stacks)
        prompts = DeepPrefix(
            n_slots, fp["kv_heads"], config.num_tokens, fp["head_dim"], fp["hidden_size"],
            reparam=config.reparam, reparam_hidden=config.reparam_hidden, dropout=config.prefix_dropout,
        )
        mode = "prefix"
    elif config.method == "prompt":
        if config.start_layer != 0:
            raise ValueError(f"start_layer must be 0 for method='prompt' (the prompt is at the input), got {config.start_layer}")
        insert = not stacks[0].causal
        prompts = SoftPrompt(_prompt_init(model, config, insert))
        mode = "insert" if insert else "prompt_kv"
    else:  # "lpt"
        prompts = LatePromptGenerator(fp["hidden_size"], config.num_tokens, config.generator, config.generator_hidden)
        mode = "insert"

    device = next(model.parameters()).device
    prompts.to(device)
    runtime = PromptRuntime(model, config, stacks, prompts, mode)
    runtime.fingerprint = fp
    heads = _head_modules(model, config) if config.train_head else []
    runtime.head_names = [n for n, _ in heads]
    first = stacks[0]
    try:
        if mode == "prefix":
            slot = 0
            for s in stacks:
                for i, attn in enumerate(s.self_attention):
                    if i >= config.start_layer:
                        _bind(runtime, attn, slot)
                        slot += 1
        elif mode == "prompt_kv":
            _install_prompt_kv(model, runtime, first, spec.absolute_positions)
        else:
            _capture_mask(runtime, first)
            if config.method == "prompt":
                soft = prompts

                def make_tokens(hs, real, source):
                    return soft.embedding[None].expand(hs.shape[0], -1, -1)
            else:
                def make_tokens(hs, real, source):
                    return prompts(hs, real, source)
            install_insertion(runtime, first, config.start_layer, config.num_tokens, make_tokens, first.rotary, _bind)

        # layers below the first prompt of the first stack have frozen inputs only: no graph there.
        # Later stacks (T5's decoder) read the first stack's output, so all their layers keep theirs.
        L = config.start_layer
        checkpointed = first.layers[L:] + [l for s in stacks[1:] for l in s.layers] if config.checkpointing else []
        install_truncation(first.layers[:L], checkpointed, runtime.wrapped_forwards, bypass=lambda: runtime.computing)
        _keep_4bit_trainable(model, runtime)

        runtime.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        model.add_module(PROMPT_MODULE, prompts)
        for p in prompts.parameters():
            p.requires_grad_(True)
        for _, head in heads:
            for p in head.parameters():
                if not p.is_floating_point():
                    raise ValueError(
                        f"the task head has non-float parameters ({p.dtype}): keep heads out of quantisation, e.g. "
                        "BitsAndBytesConfig(..., llm_int8_skip_modules=[\"classifier\", \"pooler\", \"score\"]), or pass train_head=False"
                    )
                p.requires_grad_(True)
        model.__dict__["_fastprompt_runtime"] = runtime
        attention.register()
        model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)
        _probe(model, runtime)
    except Exception:
        uninstall(model, runtime)
        raise
    return runtime


def _keep_4bit_trainable(model, runtime) -> None:
    """bitsandbytes' 4-bit layers repack their weights for CPU inference on the first eval
    forward without grad, after which no gradient flows through them: switch that off (and
    undo a repack that already happened), keeping the flags to restore on unpatch."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            runtime.bnb_cpu_packing.append((m, m.support_avx512bf16_for_cpu))
            m.support_avx512bf16_for_cpu = False
            state = getattr(m.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, state)


def uninstall(model: nn.Module, runtime: PromptRuntime) -> None:
    """Removes everything `install` added and restores attention and requires_grad flags."""
    for h in runtime.handles:
        h.remove()
    runtime.handles.clear()
    remove_truncation(runtime.wrapped_forwards)
    for m, flag in runtime.bnb_cpu_packing:
        m.support_avx512bf16_for_cpu = flag
    runtime.bnb_cpu_packing.clear()
    for m in runtime.bound:
        m.__dict__.pop("_fastprompt", None)
    runtime.bound.clear()
    if PROMPT_MODULE in model._modules:
        del model._modules[PROMPT_MODULE]
    for n, p in model.named_parameters():
        if n in runtime.requires_grad:
            p.requires_grad_(runtime.requires_grad[n])
    if model.config._attn_implementation != runtime.attn_implementation:
        model.set_attn_implementation(runtime.attn_implementation)
    model.__dict__.pop("_fastprompt_runtime", None)


def runtime_of(model: nn.Module) -> PromptRuntime | None:
    return model.__dict__.get("_fastprompt_runtime")
