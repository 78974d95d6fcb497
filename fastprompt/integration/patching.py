"""Installing prompts into a transformers model and removing them again.

Everything enters through the registered attention function (never `past_key_values`); what each
method adds is its class's business (methods/). Around it, every method gets the same: the
padding mask captured for the hooks, layers below the first prompt run without autograd and the
others checkpointed on request (truncation.py), PEFT's position shift (positions.py),
bitsandbytes fix-ups on CPU (quantized.py), trained heads (heads.py), entry points that take
prompt_ids (entry_points.py), and a probe forward that proves attention reached the function
(probe.py). Each change is recorded as it is made in the runtime's undo log (undo_log.py), which
`uninstall` replays in reverse, also when a patch fails midway. All of it reaches the model and the runtime weakly (back_references.py): a patched model
is freed as soon as it is dropped, as an unpatched one is.
"""

from __future__ import annotations

import weakref

import torch.nn as nn

from . import attention
from .architectures import spec_for
from .entry_points import wrap_entry_points
from .heads import QUANTISATION_SKIP, head_modules, install_task_heads
from .methods import method_class
from .model_shape import shape_of
from .positions import position_shift_hooks
from .probe import probe
from .quantized import install_quantized_fixes
from .runtime import PROMPT_MODULE, RUNTIME_ATTRIBUTE, PromptRuntime, capture_mask, runtime_of
from .text_init import init_text_ids
from .truncation import install_truncation

__all__ = ["install", "uninstall", "prompt_shapes", "runtime_of"]


def prompt_shapes(model: nn.Module, config) -> dict[str, tuple[int, ...]]:
    """The state_dict shapes of the prompt module `install` would build, without building it."""
    return method_class(config.method).shapes(config, shape_of(model))


def install(model: nn.Module, config, tokenizer=None) -> PromptRuntime:
    """Adds prompts to `model` in place per `config` (a PromptConfig); returns the runtime.
    tokenizer: tokenizes config.init_text (default: the model's own, loaded from its name_or_path)."""
    spec = spec_for(model)
    stacks = spec.stacks(model)
    shape = shape_of(model)
    n_layers = min(len(s.layers) for s in stacks)
    if not 0 <= config.start_layer < n_layers:
        raise ValueError(f"start_layer must be in [0, {n_layers}) for this model, got {config.start_layer}")
    config, init_ids = init_text_ids(model, config, tokenizer)
    method = method_class(config.method)(model, config, stacks, shape, spec.absolute_positions, init_ids)
    prompts = method.build()
    prompts.to(next(model.parameters()).device)
    heads = head_modules(model, config) if config.train_head else []
    runtime = PromptRuntime(config, stacks, prompts, method, shape, [n for n, _ in heads])
    undo = runtime.undo
    first = stacks[0]
    try:
        capture_mask(runtime, first)
        method.install(runtime)
        # layers below the first prompt of the first stack have frozen inputs only: no graph there.
        # Later stacks (T5's decoder) read the first stack's output, so all their layers keep theirs.
        L = config.start_layer
        with_grad = first.layers[L:] + [l for s in stacks[1:] for l in s.layers]
        bypass, skip, snapshot, restore = _forward_state(runtime)
        install_truncation(first.layers[:L], with_grad, undo, config.checkpointing, bypass=bypass, snapshot=snapshot,
                           restore=restore, skip=skip)
        if config.peft_positions:
            for handle in position_shift_hooks(model, stacks, config.num_tokens, bypass):
                undo.hook(handle)
        install_quantized_fixes(model, runtime)

        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        undo.push(lambda model: _restore_requires_grad(model, flags))
        for p in model.parameters():
            p.requires_grad_(False)
        model.add_module(PROMPT_MODULE, prompts)
        undo.push(lambda model: model._modules.pop(PROMPT_MODULE, None))
        for p in prompts.parameters():
            p.requires_grad_(True)
        for _, head in heads:
            for p in head.parameters():
                if not p.is_floating_point():
                    raise ValueError(
                        f"the task head has non-float parameters ({p.dtype}): keep heads out of quantisation, e.g. "
                        f"BitsAndBytesConfig(..., llm_int8_skip_modules={list(QUANTISATION_SKIP)}), or pass train_head=False"
                    )
                p.requires_grad_(True)
        if config.heads:
            install_task_heads(model, runtime, heads)
        wrap_entry_points(model, runtime)
        undo.set_model_attribute(model, RUNTIME_ATTRIBUTE, runtime)
        attention.register()
        previous = model.config._attn_implementation
        undo.push(lambda model: _restore_attention(model, previous))
        model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)
        probe(model, runtime)
    except Exception:
        uninstall(model, runtime)
        raise
    return runtime


def _restore_attention(model: nn.Module, implementation: str) -> None:
    if model.config._attn_implementation != implementation:
        model.set_attn_implementation(implementation)


def _restore_requires_grad(model: nn.Module, flags: dict[str, bool]) -> None:
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


def _forward_state(runtime: PromptRuntime):
    """(bypass, skip, snapshot, restore) for the layer wrappers and hooks the model holds, reaching the
    runtime weakly: bypass() while the prompt's own pass runs, skip() on a lower-layer cache hit,
    snapshot() / restore(state) -> previous for a checkpointed recompute. A snapshot holds the runtime
    strongly: the graph of a checkpointed forward keeps it for the recompute (the graph is not the model's)."""
    ref = weakref.ref(runtime)

    def bypass():
        rt = ref()
        return rt is not None and rt.forward.computing

    def skip():
        rt = ref()
        return rt is not None and rt.forward.skip_lower

    def snapshot():
        rt = ref()
        return None if rt is None else (rt, rt.forward.snapshot())

    def restore(state):
        if state is None:
            return None
        rt, snap = state
        return rt, rt.forward.restore(snap)

    return bypass, skip, snapshot, restore


def uninstall(model: nn.Module, runtime: PromptRuntime) -> None:
    """Removes everything `install` added, replaying the runtime's undo log (last change first)."""
    runtime.undo.replay(model)
