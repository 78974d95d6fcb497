"""Installing prompts into a transformers model and removing them again.

Everything enters through the registered attention function (never `past_key_values`); what each
method adds is its class's business (methods.py). Around it, every method gets the same: the
padding mask captured for the hooks, layers below the first prompt run without autograd and the
others checkpointed on request (truncation.py), PEFT's position shift (positions.py),
bitsandbytes fix-ups on CPU (quantized.py), trained heads (heads.py), entry points that take
prompt_ids (entry_points.py), and a probe forward that proves attention reached the function
(probe.py). All of it reaches the model and the runtime weakly (back_references.py): a patched model
is freed as soon as it is dropped, as an unpatched one is.
"""

from __future__ import annotations

import weakref

import torch.nn as nn

from . import attention
from .architectures import fingerprint, spec_for
from .entry_points import MISSING, wrap_entry_points
from .heads import head_modules, install_task_heads
from .methods import method_class
from .positions import position_shift_hooks
from .probe import probe
from .quantized import install_quantized_fixes, remove_quantized_fixes
from .runtime import PROMPT_MODULE, PromptRuntime, capture_mask, runtime_of
from .text_init import init_text_ids
from .truncation import install_truncation, remove_truncation

__all__ = ["install", "uninstall", "prompt_shapes", "runtime_of"]


def prompt_shapes(model: nn.Module, config) -> dict[str, tuple[int, ...]]:
    """The state_dict shapes of the prompt module `install` would build, without building it."""
    return method_class(config).shapes(config, spec_for(model).stacks(model), fingerprint(model))


def install(model: nn.Module, config, tokenizer=None) -> PromptRuntime:
    """Adds prompts to `model` in place per `config` (a PromptConfig); returns the runtime.
    tokenizer: tokenizes config.init_text (default: the model's own, loaded from its name_or_path)."""
    spec = spec_for(model)
    stacks = spec.stacks(model)
    fp = fingerprint(model)
    n_layers = min(len(s.layers) for s in stacks)
    if not 0 <= config.start_layer < n_layers:
        raise ValueError(f"start_layer must be in [0, {n_layers}) for this model, got {config.start_layer}")
    config, init_ids = init_text_ids(model, config, tokenizer)
    method = method_class(config)(model, config, stacks, fp, spec.absolute_positions, init_ids)
    prompts = method.build()
    prompts.to(next(model.parameters()).device)
    runtime = PromptRuntime(model, config, stacks, prompts, method)
    runtime.fingerprint = fp
    heads = head_modules(model, config) if config.train_head else []
    runtime.head_names = [n for n, _ in heads]
    first = stacks[0]
    try:
        capture_mask(runtime, first)
        method.install(runtime)
        # layers below the first prompt of the first stack have frozen inputs only: no graph there.
        # Later stacks (T5's decoder) read the first stack's output, so all their layers keep theirs.
        L = config.start_layer
        with_grad = first.layers[L:] + [l for s in stacks[1:] for l in s.layers]
        bypass, skip, snapshot, restore = _forward_state(runtime)
        install_truncation(
            first.layers[:L], with_grad, runtime.wrapped_forwards, config.checkpointing,
            bypass=bypass, snapshot=snapshot, restore=restore, skip=skip,
        )
        if config.peft_positions:
            runtime.handles += position_shift_hooks(model, stacks, config.num_tokens, bypass)
        install_quantized_fixes(model, runtime)

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
        if config.heads:
            install_task_heads(model, runtime, heads)
        wrap_entry_points(model, runtime)
        model.__dict__["_fastprompt_runtime"] = runtime
        attention.register()
        model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)
        probe(model, runtime)
    except Exception:
        uninstall(model, runtime)
        raise
    return runtime


def _forward_state(runtime: PromptRuntime):
    """(bypass, skip, snapshot, restore) for the layer wrappers and hooks the model holds, reaching the
    runtime weakly: bypass() while the prompt's own pass runs, skip() on a lower-layer cache hit,
    snapshot() / restore(state) -> previous for a checkpointed recompute. A snapshot holds the runtime
    strongly: the graph of a checkpointed forward keeps it for the recompute (the graph is not the model's)."""
    ref = weakref.ref(runtime)

    def bypass():
        rt = ref()
        return rt is not None and rt.computing

    def skip():
        rt = ref()
        return rt is not None and rt.skip_lower

    def snapshot():
        rt = ref()
        return None if rt is None else (rt, rt.snapshot())

    def restore(state):
        if state is None:
            return None
        rt, snap = state
        return rt, rt.restore(snap)

    return bypass, skip, snapshot, restore


def uninstall(model: nn.Module, runtime: PromptRuntime) -> None:
    """Removes everything `install` added and restores attention and requires_grad flags."""
    if runtime.lower_cache is not None:
        runtime.lower_cache.close()
    for name, previous in reversed(runtime.model_attrs):
        if previous is MISSING:
            model.__dict__.pop(name, None)
        else:
            model.__dict__[name] = previous
    runtime.model_attrs.clear()
    for name, original in reversed(runtime.replaced_heads):
        model._modules[name] = original
    runtime.replaced_heads.clear()
    for h in runtime.handles:
        h.remove()
    runtime.handles.clear()
    remove_truncation(runtime.wrapped_forwards)
    remove_quantized_fixes(runtime)
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
