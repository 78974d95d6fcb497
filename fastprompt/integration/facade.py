"""The integration layer's one face to the layers above: everything api.py, banks.py, config.py,
planner.py, serialization.py, peft_io.py and the trainer use of it (installing and removing prompts, finding a patched
model's runtime through wrappers, shapes a load validates against, the method registry), so the
modules behind it change without reaching the public API."""

from __future__ import annotations

import torch.nn as nn

from .architectures import SUPPORTED, Stack, UnsupportedModelError, spec_for
from .heads import HEAD_NAMES, QUANTISATION_SKIP, head_shapes
from .lower_cache import LowerLayerCache, install_lower_cache
from .methods import REGISTRY, Method, method_class, method_names
from .model_shape import BERT_LIKE, GATED, ModelShape, shape_of
from .patching import install, prompt_shapes, uninstall
from .prompts import TaskHeads
from .runtime import PromptRuntime, runtime_of

__all__ = [
    "BERT_LIKE", "GATED", "HEAD_NAMES", "QUANTISATION_SKIP", "SUPPORTED", "LowerLayerCache", "Method", "ModelShape",
    "PromptRuntime", "Stack", "TaskHeads", "UnsupportedModelError", "head_shapes", "install", "install_lower_cache",
    "method_class", "method_for_peft_type", "method_names", "model_inside", "patched_runtime", "prompt_shapes",
    "runtime_of", "shape_of", "spec_for", "uninstall", "unwrap",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The patched model inside wrappers that keep it as `.module` (DistributedDataParallel,
    DataParallel, accelerate's wrappers), or `model` itself."""
    inner = model
    while runtime_of(inner) is None and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    return inner if runtime_of(inner) is not None else model


def model_inside(model: nn.Module) -> nn.Module:
    """The model to patch or load into inside `.module` wrappers: the patched one (`unwrap`), else the
    first in the chain with a transformers `config`, else `model` itself."""
    inner = unwrap(model)
    while runtime_of(inner) is None and not hasattr(inner, "config") and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    return inner


def patched_runtime(model: nn.Module) -> PromptRuntime:
    """The PromptRuntime of a patched model (wrappers unwrapped), or RuntimeError saying to patch first."""
    runtime = runtime_of(unwrap(model))
    if runtime is None:
        raise RuntimeError("this model is not patched by fastprompt; call fastprompt.patch(model, ...) first")
    return runtime


def method_for_peft_type(peft_type: str) -> str | None:
    """The method name whose numerics equal a PEFT adapter type's, or None."""
    return next((name for name, cls in REGISTRY.items() if cls.peft_type == peft_type), None)
