"""Prompt banks: one task's slice of a bank, and growing a bank by a task.

A bank holds T prompts (PromptConfig.num_tasks) in the layout its method class knows
(integration/methods/: task tensors with a leading task dimension, or one lpt generator per
task), and per-task heads are a TaskHeads bank (T, L, H). These helpers move one task in and out.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .integration.facade import TaskHeads, patched_runtime, unwrap


def task_tensors(model: nn.Module, task: int) -> dict[str, torch.Tensor]:
    """One task's tensors in the layout of a single-task save: `prompt.*` and `head.*`.

    Per-task heads are cut to the task's own label count, so the export loads into a model
    built with num_labels = that count."""
    runtime = patched_runtime(model)
    model = unwrap(model)
    config = runtime.config
    _check_task(config, task, "task")
    out = {f"prompt.{k}": v for k, v in runtime.method.task_state(runtime.prompts, task).items()}
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
    runtime.method.load_task_state(runtime.prompts, {k[len("prompt."):]: v for k, v in tensors.items() if k.startswith("prompt.")}, task)
    with torch.no_grad():
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

    runtime.method.grow(prompts)
    if heads:
        head.grow(num_labels)
    runtime.task_added(name, num_labels)
    return config.num_tasks
