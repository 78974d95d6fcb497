"""The drop-in entry points: patch, unpatch, prompt_config, prompt_parameters, cache_lower_layers
(and unwrap / patched_runtime, re-exported from the integration facade)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import PromptConfig
from .integration.facade import (
    LowerLayerCache,
    install,
    install_lower_cache,
    patched_runtime,
    runtime_of,
    uninstall,
    unwrap,
)


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
    runtime = patched_runtime(model)
    if runtime.config.start_layer == 0:
        raise ValueError("the lower-layer cache needs prompts from a start_layer > 0 (nothing runs below layer 0)")
    if runtime.lower_cache is not None:
        raise RuntimeError("this model already has a lower-layer cache")
    cache = LowerLayerCache(runtime.shape.hidden, dtype or torch.bfloat16, path)
    install_lower_cache(runtime, runtime.stacks[0], runtime.config.start_layer, cache)
    runtime.attach_lower_cache(cache)
    return cache
