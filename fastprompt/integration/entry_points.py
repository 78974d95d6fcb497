"""The patched model's entry points: `forward` and `generate` gain `prompt_ids` (and `example_ids`,
for the lower-layer cache), checked before the model runs, and set the per-forward state the
attention function reads."""

from __future__ import annotations

import inspect
import weakref

import torch

from .back_references import weak_method
from .positions import positions_from_mask


def _inputs(args, kwargs) -> torch.Tensor | None:
    """The (B, T) input_ids or (B, T, H) inputs_embeds a forward or generate() was called with."""
    for x in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(x, torch.Tensor):
            return x
    return None


def _batch_size(args, kwargs) -> int | None:
    x = _inputs(args, kwargs)
    return None if x is None else x.shape[0]


def _input_length(args, kwargs) -> int | None:
    x = _inputs(args, kwargs)
    return x.shape[1] if x is not None and x.dim() >= 2 else None


def source_lengths(labels) -> torch.Tensor | None:
    """(B,) the number of tokens before each row's first predicted token (labels (B, T), -100 =
    not predicted; the model predicts labels[:, t] from tokens < t, so label 0 is never a target),
    or None when labels are not token labels. A row without targets keeps its whole length."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.is_floating_point():
        return None
    target = labels != -100
    target[:, 0] = False
    first = target.long().argmax(-1)
    return torch.where(target.any(-1), first, torch.full_like(first, labels.shape[1]))


def _check_labels(runtime, labels, ids) -> None:
    """With per-task heads, every label must be one of its example's task's labels."""
    if not isinstance(labels, torch.Tensor) or labels.device.type != "cpu" or labels.is_floating_point():
        return
    counts = torch.tensor([c for _, c in runtime.config.heads])
    tasks = torch.zeros(labels.shape[0], dtype=torch.long) if ids is None else ids.cpu()
    limit = counts[tasks].view(-1, *([1] * (labels.dim() - 1)))
    bad = ((labels >= limit) | ((labels < 0) & (labels != -100))).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        name, count = runtime.config.heads[int(tasks[i])]
        raise ValueError(f"labels: example {i} has label {int(labels[tuple(bad[0])])} but its task {name!r} has {count} labels")


def wrap_entry_points(model, runtime) -> None:
    """model.forward and model.generate take `prompt_ids` (instance attributes; unpatch removes them).
    The model holds them, so they hold the model and the runtime weakly (back_references.py)."""
    try:  # a causal LM's head predicts the next token (token classification heads are not output embeddings)
        predicts_tokens = model.get_output_embeddings() is not None
    except (AttributeError, NotImplementedError):
        predicts_tokens = False
    late_lm = runtime.method.reads_input and runtime.stacks[0].causal and predicts_tokens
    runtime_ref = weakref.ref(runtime)

    def with_prompt_ids(original, is_forward):
        sig = inspect.signature(original)
        params = [p for p in sig.parameters.values() if p.name not in ("prompt_ids", "example_ids")]
        at = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
        for name in ("example_ids", "prompt_ids"):
            params.insert(at, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None))

        call = weak_method(model, original)

        def wrapper(*args, prompt_ids=None, example_ids=None, **kwargs):
            runtime = runtime_ref()
            if runtime is None:  # kept from before an unpatch: the model as it is now
                if prompt_ids is not None or example_ids is not None:
                    raise RuntimeError("this model is not patched by fastprompt any more: prompt_ids and example_ids need fastprompt.patch")
                return call(*args, **kwargs)
            if prompt_ids is None and runtime.forward.prompt_ids is not None:
                ids = runtime.forward.prompt_ids  # called inside generate(): the ids it was given
            else:
                ids = runtime.check_prompt_ids(prompt_ids, _batch_size(args, kwargs))
            if runtime.config.heads and is_forward:
                _check_labels(runtime, kwargs.get("labels"), ids)
            if is_forward:
                positions_from_mask(runtime, kwargs)
            if not is_forward and ids is not None:
                kwargs["prompt_ids"] = ids  # generate() expands it with the batch (beams, samples)
            if example_ids is not None:
                example_ids = runtime.check_example_ids(example_ids, _batch_size(args, kwargs))
            previous = runtime.forward.prompt_ids, runtime.forward.example_ids, runtime.forward.source_len
            runtime.forward.prompt_ids, runtime.forward.example_ids = ids, example_ids
            if not is_forward and runtime.forward.source_len is None:
                # a late prompt is generated from the input given to generate(), so every new token sees
                # the same prompt whether generate() runs with a KV cache or recomputes the whole sequence
                runtime.forward.source_len = _input_length(args, kwargs)
            elif is_forward and runtime.forward.source_len is None and late_lm:
                # training a causal LM: the late prompt comes from the tokens before the first target,
                # as at generation; read from the whole sequence it would hand every position the answer
                runtime.forward.source_len = source_lengths(kwargs.get("labels"))
            try:
                return call(*args, **kwargs)
            finally:
                runtime.forward.prompt_ids, runtime.forward.example_ids, runtime.forward.source_len = previous
                runtime.forward.skip_lower = False

        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__doc__ = original.__doc__
        wrapper.__name__ = getattr(original, "__name__", "forward")
        return wrapper

    for name in ("forward", "generate"):
        if not hasattr(model, name):
            continue
        runtime.undo.set_model_attribute(model, name, with_prompt_ids(getattr(model, name), name == "forward"))
