"""save_prompts / load_prompts / read_prompt_config: `prompts.safetensors` + `fastprompt.json`,
written atomically, of a whole bank or one task of it.

Only safetensors and JSON are ever read (no pickle, nothing executed from a file). A load checks
the JSON, the model fingerprint, the tensor file's checksum, names, shapes and dtypes before it
changes anything in the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn

from .api import patch, prompt_parameters
from .banks import copy_into_task, single_task_config, task_tensors
from .config import PromptConfig
from .integration.facade import head_shapes, model_inside, patched_runtime, prompt_shapes, runtime_of, shape_of, unwrap
from .storage import PromptLoadError, atomic_write, read_json_object
from .version import __version__

TENSORS_FILE = "prompts.safetensors"
CONFIG_FILE = "fastprompt.json"
FORMAT_VERSION = 2  # 2: every prompt tensor has a leading task dimension
_JSON_FIELDS = {
    "format_version", "library_version", "method", "num_tokens", "start_layer", "dtype", "config", "fingerprint",
    "heads", "reparam_weights", "tensors_sha256",
}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor shard (FSDP2's fully_shard) gathered into the whole tensor (a collective); others as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") and hasattr(t, "device_mesh") else t


def _gathered(params: list[nn.Parameter]):
    """A context in which DeepSpeed ZeRO-3's partitioned parameters are whole (a collective)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def _sharded(params: list[nn.Parameter]) -> bool:
    """Partitioned across ranks: FSDP2 (DTensor) or DeepSpeed ZeRO-3."""
    return any(hasattr(p, "device_mesh") or hasattr(p, "ds_id") for p in params)


def _tensors_to_save(runtime, model, task, reparam_weights):
    """(name -> whole tensor on CPU, the config to save with them)."""
    cfg = runtime.config.without_init()  # the tensors hold the prompt; how it started is not needed to load it
    if task is None:
        tensors = {f"prompt.{k}": v for k, v in runtime.prompts.state_dict().items()}
        for name in runtime.head_names:
            for k, v in getattr(model, name).state_dict().items():
                tensors[f"head.{name}.{k}"] = v
    else:
        tensors = task_tensors(model, task)
        cfg = single_task_config(cfg, task)
    if cfg.reparam:
        folded = runtime.prompts.folded().detach()
        if task is not None:
            folded = folded[task : task + 1]
        if not reparam_weights:
            tensors = {k: v for k, v in tensors.items() if not k.startswith("prompt.")}
        tensors["prompt.prefix"] = folded
    # copies: gathered ZeRO-3 storage is freed again when the gathering context ends
    return {k: _full(v).detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}, cfg


def save_prompts(model: nn.Module, path: str | os.PathLike, *, task: int | None = None, reparam_weights: bool = False) -> Path:
    """Writes the prompts (and trained heads) of a patched model to directory `path`; returns it.

    task: save only that task of a bank, as a single-task prompt (per-task heads cut to the
    task's label count) that loads on its own or into another bank's slot.
    reparam_weights: with reparam=True the file always holds the folded prefix (all inference
    needs); this adds the reparameterisation's embedding and MLP, for further training.
    A model sharded with FSDP2 (`fully_shard`) or DeepSpeed ZeRO-3: call it on every rank (the
    prompts are gathered, a collective); rank 0 writes.
    """
    runtime = patched_runtime(model)
    model = unwrap(model)
    if not isinstance(reparam_weights, bool):
        raise ValueError(f"reparam_weights must be True or False, got {reparam_weights!r}")
    params = list(runtime.prompts.parameters()) + [p for n in runtime.head_names for p in getattr(model, n).parameters()]
    with _gathered(params):
        tensors, cfg = _tensors_to_save(runtime, model, task, reparam_weights)
    if _sharded(params) and torch.distributed.get_rank() != 0:
        return Path(path)  # every rank gathered the whole tensors above (a collective); rank 0 writes them
    blob = safetensors.torch.save(tensors)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "method": cfg.method,
        "num_tokens": cfg.num_tokens,
        "start_layer": cfg.start_layer,
        "dtype": str(next(runtime.prompts.parameters()).dtype).removeprefix("torch."),
        "config": cfg.to_dict(),
        "fingerprint": runtime.shape.fingerprint(),
        "heads": list(runtime.head_names),
        "reparam_weights": bool(cfg.reparam and reparam_weights),
        # the JSON is written last and names the tensors it belongs to: a save cut between the two
        # renames is detected at load instead of pairing an old config with new tensors
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
    }
    atomic_write(out / TENSORS_FILE, blob)
    atomic_write(out / CONFIG_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return out


def read_prompt_config(path: str | os.PathLike) -> tuple[PromptConfig, dict]:
    """Parses and validates `fastprompt.json` in `path`: (config, the whole JSON)."""
    f = Path(path) / CONFIG_FILE
    meta = read_json_object(f, "a directory written by fastprompt.save_prompts")
    missing, unknown = sorted(_JSON_FIELDS - set(meta)), sorted(set(meta) - _JSON_FIELDS)
    if missing or unknown:
        raise PromptLoadError(f"{f}: missing fields {missing}, unknown fields {unknown}")
    if meta["format_version"] != FORMAT_VERSION:
        raise PromptLoadError(f"{f}: format_version {meta['format_version']} is not {FORMAT_VERSION}")
    try:
        # a prompt's start (init_text, prefix_init) is history once it is saved
        config = PromptConfig.from_dict(meta["config"]).without_init()
    except (TypeError, ValueError) as e:
        raise PromptLoadError(f"{f}: bad config: {e}") from None
    for k in ("method", "num_tokens", "start_layer"):
        if meta[k] != getattr(config, k):
            raise PromptLoadError(f"{f}: field {k}={meta[k]!r} disagrees with config.{k}={getattr(config, k)!r}")
    return config, meta


def _differences(saved: dict, current: dict) -> list[str]:
    return [f"{k}: saved {saved.get(k)!r}, model {current.get(k)!r}" for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def load_prompts(model: nn.Module, path: str | os.PathLike, *, trainable: bool = False, task: int | None = None) -> nn.Module:
    """Loads prompts saved by `save_prompts` into `model`, patching it first if it is not patched.

    trainable: leave the prompts (and heads) trainable to continue training; False freezes them
    for inference. A reparam=True prompt saved with its reparameterisation weights continues
    with them; one saved folded only loads as a plain prefix (reparam=False).
    task: load a single-task save into slot `task` of a model already patched with a bank.
    Everything is validated before the model is changed: the JSON, the model fingerprint
    (architecture, layers, heads, kv heads, head dim, hidden size), an already-patched model's
    config, the tensor file's checksum, tensor names, shapes and dtypes.
    """
    if not isinstance(trainable, bool):
        raise ValueError(f"trainable must be True or False, got {trainable!r}")
    given, model = model, model_inside(model)  # through DistributedDataParallel-style wrappers, as save_prompts
    config, meta = read_prompt_config(path)
    diffs = _differences(meta["fingerprint"], shape_of(model).fingerprint())
    if diffs:
        raise PromptLoadError(f"{path}: prompts were saved for another model: " + "; ".join(diffs))
    runtime = runtime_of(model)
    has_weights = bool(meta["reparam_weights"])
    # the config the model runs with: a folded-only reparam prompt is a plain prefix
    if config.reparam and runtime is not None and runtime.config.reparam:
        if not has_weights:
            raise PromptLoadError(f"{path}: saved without the reparameterisation weights (save_prompts(..., reparam_weights=True)); "
                                  "the model is patched with reparam=True")
        target = config
    elif config.reparam and not (has_weights and trainable and runtime is None):
        target = dataclasses.replace(config, reparam=False)
    else:
        target = config
    if task is not None:
        if runtime is None:
            raise PromptLoadError("task= loads into a slot of a model already patched with a bank (num_tasks > 1)")
        if config.num_tasks != 1:
            raise PromptLoadError(f"{path}: task= needs a single-task save (save_prompts(..., task=i)), this one holds {config.num_tasks} tasks")
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < runtime.config.num_tasks:
            raise ValueError(f"task must be in [0, {runtime.config.num_tasks}), got {task!r}")
        if runtime.config.reparam:
            raise PromptLoadError("task= cannot load into a reparam=True bank: its MLP is shared by every task")
    if runtime is not None:
        current = runtime.config
        if task is not None:
            current = single_task_config(current, task)
        diffs = _differences(target.prompt_fields(), current.prompt_fields())
        if diffs:
            raise PromptLoadError(f"{path}: the model is patched with another prompt config: " + "; ".join(diffs))
    tfile = Path(path) / TENSORS_FILE
    if not tfile.is_file():
        raise PromptLoadError(f"{tfile}: no such file")
    blob = tfile.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["tensors_sha256"]:
        raise PromptLoadError(f"{tfile}: checksum does not match {CONFIG_FILE} (truncated, corrupt or from another save)")
    try:
        tensors = safetensors.torch.load(blob)
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise PromptLoadError(f"{tfile}: not a valid safetensors file ({e})") from None
    folded = dataclasses.replace(config, reparam=False)
    expected = {f"prompt.{k}": s for k, s in prompt_shapes(model, folded if config.reparam else config).items()}
    if has_weights:
        expected.update({f"prompt.{k}": s for k, s in prompt_shapes(model, config).items()})
    if task is not None and runtime.config.heads:
        # a bank (T, L, ...) takes the task's own (labels, ...) rows
        labels = runtime.config.heads[task][1]
        for name in set(runtime.head_names) & set(meta["heads"]):
            expected.update({f"head.{name}.{k}": (labels, *v.shape[2:]) for k, v in getattr(model, name).state_dict().items()})
    else:
        expected.update({f"head.{k}": s for k, s in head_shapes(model, config).items() if k.split(".")[0] in meta["heads"]})
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        raise PromptLoadError(f"{tfile}: tensors {sorted(got.items())} do not match what this model expects {sorted(expected.items())}")
    bad = [k for k, v in tensors.items() if not v.is_floating_point()]
    if bad:
        raise PromptLoadError(f"{tfile}: tensors {bad} are not floating point")

    if runtime is None:
        patch(model, target)
        runtime = runtime_of(model)
    if task is not None:
        copy_into_task(model, tensors, task)
    else:
        with torch.no_grad():
            for k, p in runtime.prompts.state_dict(keep_vars=True).items():
                p.copy_(tensors[f"prompt.{k}"])
            for name in meta["heads"]:
                for k, p in getattr(model, name).state_dict(keep_vars=True).items():
                    p.copy_(tensors[f"head.{name}.{k}"])
    for p in prompt_parameters(model):  # the prompt's, then the trained heads'
        p.requires_grad_(trainable)
    return given
