"""patch / unpatch / prompt_parameters: the drop-in entry points."""

from __future__ import annotations

import torch.nn as nn

from .config import PromptConfig
from .integration.patching import install, runtime_of, uninstall


def patch(model: nn.Module, config: PromptConfig | None = None, *, tokenizer=None, **kwargs) -> nn.Module:
    """Adds trainable prompts to a transformers model in place and returns it.

    Either a PromptConfig or its fields as keywords (method="ptv2", num_tokens=16, start_layer=0,
    reparam=False, train_head=True, init_text=None, ...). Everything but the prompts (and the task
    head when train_head) is frozen. tokenizer: tokenizes init_text (default: the one saved with the
    model, loaded from its name_or_path). Raises ValueError for bad arguments and
    UnsupportedModelError for architectures whose attention fastprompt cannot reach.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if config is not None and kwargs:
        raise ValueError(f"pass either config or keyword fields, not both (got config and {sorted(kwargs)})")
    if config is None:
        config = PromptConfig(**kwargs)
    elif not isinstance(config, PromptConfig):
        raise TypeError(f"config must be a fastprompt.PromptConfig, got {type(config).__name__}")
    if runtime_of(model) is not None:
        raise RuntimeError("this model is already patched by fastprompt; call fastprompt.unpatch(model) first")
    install(model, config, tokenizer)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Removes the prompts and restores the model as it was before `patch` (attention, grads); returns it."""
    runtime = runtime_of(model)
    if runtime is None:
        raise RuntimeError("this model is not patched by fastprompt; nothing to unpatch")
    uninstall(model, runtime)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The patched model inside wrappers that keep it as `.module` (DistributedDataParallel,
    DataParallel, accelerate's wrappers), or `model` itself."""
    inner = model
    while runtime_of(inner) is None and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    return inner if runtime_of(inner) is not None else model


def patched_runtime(model):
    """The PromptRuntime of a patched model (wrappers unwrapped), or RuntimeError saying to patch first."""
    runtime = runtime_of(unwrap(model))
    if runtime is None:
        raise RuntimeError("this model is not patched by fastprompt; call fastprompt.patch(model, ...) first")
    return runtime


def prompt_config(model: nn.Module) -> PromptConfig:
    """The PromptConfig a patched model was patched with."""
    return patched_runtime(model).config


def prompt_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors: the prompt's parameters, then the task head's when train_head
    (also through a DistributedDataParallel-style wrapper)."""
    runtime = patched_runtime(model)
    model = unwrap(model)
    params = list(runtime.prompts.parameters())
    for name in runtime.head_names:
        params += list(getattr(model, name).parameters())
    return params


def cache_lower_layers(model: nn.Module, dtype=None, path=None):
    """Turns on the lower-layer cache of a patched model (prompts from start_layer L > 0); returns it.

    Pass `example_ids=LongTensor[B]` (dataset indices) to the model's forward: the first time an
    example is seen, the hidden states entering layer L are stored (real tokens only; `dtype`
    bf16 by default, fp32 for bit-identical results; in memory, or memory-mapped in the file
    `path`); a batch whose examples are all stored runs only layers >= L. The lower layers must
    be deterministic (no dropout active below L), which frozen layers in eval mode or
    dropout-free models are. Returns the LowerLayerCache (len, nbytes, hits, misses).
    """
    import torch

    from .integration.architectures import fingerprint
    from .integration.lower_cache import LowerLayerCache, install_lower_cache

    runtime = patched_runtime(model)
    model = unwrap(model)
    if runtime.config.start_layer == 0:
        raise ValueError("the lower-layer cache needs prompts from a start_layer > 0 (nothing runs below layer 0)")
    if runtime.lower_cache is not None:
        raise RuntimeError("this model already has a lower-layer cache")
    if runtime.mode == "prompt_kv":
        raise ValueError("input prompts on decoders start at layer 0; the lower-layer cache does not apply")
    cache = LowerLayerCache(fingerprint(model)["hidden_size"], dtype or torch.bfloat16, path)
    install_lower_cache(runtime, runtime.stacks[0], runtime.config.start_layer, cache)
    runtime.lower_cache = cache
    return cache
