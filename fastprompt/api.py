"""patch / unpatch / prompt_parameters: the drop-in entry points."""

from __future__ import annotations

import torch.nn as nn

from .config import PromptConfig
from .integration.patching import install, runtime_of, uninstall


def patch(model: nn.Module, config: PromptConfig | None = None, **kwargs) -> nn.Module:
    """Adds trainable prompts to a transformers model in place and returns it.

    Either a PromptConfig or its fields as keywords (method="ptv2", num_tokens=16, start_layer=0,
    reparam=False, train_head=True, ...). Everything but the prompts (and the task head when
    train_head) is frozen. Raises ValueError for bad arguments and UnsupportedModelError for
    architectures whose attention fastprompt cannot reach.
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
    install(model, config)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Removes the prompts and restores the model as it was before `patch` (attention, grads); returns it."""
    runtime = runtime_of(model)
    if runtime is None:
        raise RuntimeError("this model is not patched by fastprompt; nothing to unpatch")
    uninstall(model, runtime)
    return model


def _runtime(model):
    runtime = runtime_of(model)
    if runtime is None:
        raise RuntimeError("this model is not patched by fastprompt; call fastprompt.patch(model, ...) first")
    return runtime


def prompt_config(model: nn.Module) -> PromptConfig:
    """The PromptConfig a patched model was patched with."""
    return _runtime(model).config


def prompt_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors: the prompt's parameters, then the task head's when train_head."""
    runtime = _runtime(model)
    params = list(runtime.prompts.parameters())
    for name in runtime.head_names:
        params += list(getattr(model, name).parameters())
    return params
