"""Task heads: the one list of head module names (HEAD_NAMES, and QUANTISATION_SKIP for loaders), which
modules are the trained head (one of those, or head=NAME), their shapes for loading, and installing
the per-task head bank that replaces a linear head (config.heads; TaskHeads in prompts.py)."""

from __future__ import annotations

import torch.nn as nn

from .prompts import TaskHeads

HEAD_NAMES = ("classifier", "score", "qa_outputs")  # a transformers model's task head, by task
# kept in float when a backbone is quantised: the heads, and BERT's pooler that feeds its classifier
QUANTISATION_SKIP = ("classifier", "pooler", "score", "qa_outputs")


def head_modules(model, config) -> list[tuple[str, nn.Module]]:
    names = [config.head] if config.head else list(HEAD_NAMES)
    found = [(n, getattr(model, n)) for n in names if isinstance(getattr(model, n, None), nn.Module)]
    if config.head and not found:
        raise ValueError(f"head={config.head!r}: the model has no submodule of that name")
    return found


def install_task_heads(model, runtime, heads) -> None:
    """Replaces the model's linear head by a TaskHeads bank (config.heads)."""
    counts = [c for _, c in runtime.config.heads]
    if len(heads) != 1 or not isinstance(heads[0][1], nn.Linear):
        found = ", ".join(f"{n} ({type(m).__name__})" for n, m in heads) or "none"
        raise ValueError(f"heads= needs a model with one nn.Linear task head (classifier/score, or head=NAME); found: {found}")
    name, linear = heads[0]
    if linear.out_features != max(counts):
        raise ValueError(
            f"heads={dict(runtime.config.heads)} needs the model built with num_labels={max(counts)} (the largest "
            f"task), but its {name} has {linear.out_features} outputs"
        )
    if not linear.weight.is_floating_point():
        raise ValueError(f"the task head {name} is quantised ({linear.weight.dtype}); keep heads out of quantisation")
    model._modules[name] = TaskHeads(linear, counts, runtime)
    runtime.undo.push(lambda model: model._modules.__setitem__(name, linear))


def head_shapes(model: nn.Module, config) -> dict[str, tuple[int, ...]]:
    """name -> shape of the head parameters `install` would make trainable, keyed '<head>.<param>'."""
    if not config.train_head:
        return {}
    shapes = {}
    for n, m in head_modules(model, config):
        for k, v in m.state_dict().items():
            # per-task heads: a bank (T, L, H) / (T, L) in place of the linear head's (L, H) / (L,)
            bank = config.heads and not isinstance(m, TaskHeads)
            shapes[f"{n}.{k}"] = (config.num_tasks, *v.shape) if bank else tuple(v.shape)
    return shapes
