"""Prompt banks: one task's slice of a bank, and growing a bank by a task.

A bank holds T prompts (PromptConfig.num_tasks); every prompt tensor named in its module's
`task_dim_keys` has a leading task dimension, an lpt bank holds `generators.<t>`, and per-task
heads are a TaskHeads bank (T, L, H). These helpers move one task in and out of that layout.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .api import patched_runtime, unwrap
from .integration.patching import prompt_init
from .integration.prompts import LatePromptGenerator, TaskHeads


def task_tensors(model: nn.Module, task: int) -> dict[str, torch.Tensor]:
    """One task's tensors in the layout of a single-task save: `prompt.*` and `head.*`.

    Per-task heads are cut to the task's own label count, so the export loads into a model
    built with num_labels = that count."""
    runtime = patched_runtime(model)
    model = unwrap(model)
    config = runtime.config
    _check_task(config, task, "task")
    prompts = runtime.prompts
    keys = getattr(prompts, "task_dim_keys", ())
    out = {}
    for k, v in prompts.state_dict().items():
        if k.startswith("generators."):
            i, rest = k.split(".", 2)[1:]
            if int(i) == task:
                out[f"prompt.generators.0.{rest}"] = v
        elif k in keys:
            out[f"prompt.{k}"] = v[task : task + 1]
        else:
            out[f"prompt.{k}"] = v
    for name in runtime.head_names:
        head = getattr(model, name)
        for k, v in head.state_dict().items():
            if isinstance(head, TaskHeads):
                n = config.heads[task][1]
                v = v[task, :n]
            out[f"head.{name}.{k}"] = v
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def single_task_config(config, task: int):
    """The PromptConfig of one task's export: num_tasks 1, no per-task heads."""
    return dataclasses.replace(config, num_tasks=1, heads=None)


def copy_into_task(model: nn.Module, tensors: dict[str, torch.Tensor], task: int) -> None:
    """Writes a single-task save's tensors (already validated) into bank slot `task`."""
    runtime = patched_runtime(model)
    model = unwrap(model)
    prompts = runtime.prompts
    keys = getattr(prompts, "task_dim_keys", ())
    state = prompts.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, p in state.items():
            if k.startswith("generators."):
                i, rest = k.split(".", 2)[1:]
                if int(i) == task:
                    p.copy_(tensors[f"prompt.generators.0.{rest}"])
            elif k in keys:
                p[task].copy_(tensors[f"prompt.{k}"][0])
            else:
                p.copy_(tensors[f"prompt.{k}"])
        for name in runtime.head_names:
            head = getattr(model, name)
            for k, p in head.state_dict(keep_vars=True).items():
                src = tensors.get(f"head.{name}.{k}")
                if src is None:
                    continue
                if isinstance(head, TaskHeads):
                    p[task, : src.shape[0]].copy_(src)
                else:
                    p.copy_(src)


def _check_task(config, task, name):
    if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < config.num_tasks:
        raise ValueError(f"{name} must be a task index in [0, {config.num_tasks}), got {task!r}")


def add_task(model: nn.Module, name: str | None = None, num_labels: int | None = None) -> int:
    """Grows a patched model's bank by one freshly initialised task; returns its index.

    With per-task heads (PromptConfig.heads) give the task's `name` and `num_labels` (at most
    the head's width). The bank's tensors are replaced by larger ones: build the optimizer
    after adding tasks (or add the new parameters to it). Fill the new task with
    `load_prompts(model, path, task=index)` to import a trained single-task prompt.
    """
    runtime = patched_runtime(model)
    model = unwrap(model)
    config = runtime.config
    prompts = runtime.prompts
    heads = config.heads
    if heads:
        head = getattr(model, runtime.head_names[0])
        width = head.weight.shape[1]
        if not isinstance(name, str) or name in dict(heads):
            raise ValueError(f"name must be a new task name (tasks: {[n for n, _ in heads]}), got {name!r}")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or not 2 <= num_labels <= width:
            raise ValueError(f"num_labels must be an int in [2, {width}] (the head's width), got {num_labels!r}")
    elif name is not None or num_labels is not None:
        raise ValueError("name and num_labels are for models patched with per-task heads (heads=...)")

    if hasattr(prompts, "generators"):
        ref = prompts.generators[0]
        gen = LatePromptGenerator(*prompts.args).to(device=ref.down.weight.device, dtype=ref.down.weight.dtype)
        prompts.generators.append(gen.requires_grad_(True))
    else:
        for key in prompts.task_dim_keys:
            old = getattr(prompts, key, None)
            if old is None:
                continue
            if key == "embedding" and not hasattr(prompts, "mlp"):  # a soft prompt: vocabulary init
                row = prompt_init(model, dataclasses.replace(config, num_tasks=1), runtime.mode == "insert")
            else:
                row = torch.randn_like(old[:1])  # N(0, 1) as at patch time
            setattr(prompts, key, nn.Parameter(torch.cat([old.detach(), row.to(old)]), requires_grad=True))
    if heads:
        original = runtime.replaced_heads[0][1]
        for key in head.task_dim_keys:
            old = getattr(head, key)
            if old is None:
                continue
            row = getattr(original, key).detach()[None].to(old)
            setattr(head, key, nn.Parameter(torch.cat([old.detach(), row]), requires_grad=True))
        head.labels = torch.cat([head.labels, head.labels.new_tensor([num_labels])])
        heads = (*heads, (name, num_labels))
    runtime.config = dataclasses.replace(config, num_tasks=config.num_tasks + 1, heads=heads)
    return config.num_tasks
