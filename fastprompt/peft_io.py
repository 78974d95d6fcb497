"""PEFT interoperability: import and export PREFIX_TUNING / PROMPT_TUNING adapter directories.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors` with
`prompt_embeddings`: (P, layers * 2 * Hkv * D) laid out [P, layer, K|V, kv_head, head_dim] for
PREFIX_TUNING (always the folded prefix, also when trained with prefix_projection), or (P, hidden)
input embeddings for PROMPT_TUNING, plus the task head as `base_model.<head>.<param>` when PEFT
trained one (modules_to_save). PEFT keeps its prefix in the KV cache, so real tokens sit at
positions P..P+T-1; fastprompt's default keeps them at 0..T-1. `from_peft` therefore patches
with `peft_positions=True` unless told otherwise, which reproduces PEFT's outputs exactly.
Nothing here imports peft; only JSON and safetensors are read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn

from .api import patch, prompt_parameters
from .config import PromptConfig
from .integration.facade import method_for_peft_type, patched_runtime, runtime_of, shape_of, spec_for, unwrap
from .storage import PromptLoadError, atomic_write, read_json_object
from .version import __version__

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_TASK_TYPES = (  # class-name suffix -> PEFT task_type
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
)


def _task_type(model) -> str:
    name = type(model).__name__
    return next((t for suffix, t in _TASK_TYPES if name.endswith(suffix)), "FEATURE_EXTRACTION")


def _single_stack(model, what):
    stacks = spec_for(model).stacks(model)
    if len(stacks) != 1:
        raise ValueError(f"{what}: {type(model).__name__} has {len(stacks)} layer stacks; PEFT adapters of encoder-decoder models are not supported")
    return stacks[0]


def from_peft(model: nn.Module, path: str | os.PathLike, *, peft_positions: bool = True, trainable: bool = False) -> nn.Module:
    """Patches `model` with the prompt of a PEFT PREFIX_TUNING or PROMPT_TUNING adapter directory.

    peft_positions=True (default) shifts real-token positions by P as PEFT does, so outputs equal
    PEFT's; False uses fastprompt's unshifted positions (then an imported prefix sees other
    rotary phases / position embeddings than it was trained with). The task head saved with the
    adapter is loaded too. trainable: leave the prompt (and head) trainable.
    Everything is validated before the model is touched.
    """
    d = Path(path)
    cfile, wfile = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    cfg = read_json_object(cfile, "a PEFT adapter directory")
    if not wfile.is_file():
        raise PromptLoadError(f"{wfile}: no such file (expected a PEFT adapter directory)")
    kind = cfg.get("peft_type")
    method = method_for_peft_type(kind) if isinstance(kind, str) else None
    if method is None:
        raise PromptLoadError(f"{cfile}: peft_type must be PREFIX_TUNING or PROMPT_TUNING, got {kind!r}")
    try:
        tensors = safetensors.torch.load(wfile.read_bytes())
    except Exception as e:
        raise PromptLoadError(f"{wfile}: not a valid safetensors file ({e})") from None
    if "prompt_embeddings" not in tensors:
        raise PromptLoadError(f"{wfile}: no prompt_embeddings tensor (has {sorted(tensors)})")
    if runtime_of(model) is not None:
        raise RuntimeError("from_peft patches the model itself; call it on an unpatched model")
    stack = _single_stack(model, "from_peft")
    shape = shape_of(model)
    emb = tensors["prompt_embeddings"].float()
    p = cfg.get("num_virtual_tokens")
    layers, hkv, dh, hidden = shape.stack_layers[0], shape.kv_heads, shape.head_dim, shape.hidden
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise PromptLoadError(f"{cfile}: num_transformer_submodules={cfg['num_transformer_submodules']}; only single-stack models are supported")
    if kind == "PREFIX_TUNING":
        want = (p, layers * 2 * hkv * dh)
    else:
        if not stack.causal:
            raise PromptLoadError(
                f"{cfile}: PROMPT_TUNING adapters import on decoder models only (on encoders PEFT feeds the prompt "
                "through the embedding layer and classifies from a virtual token, which fastprompt's encoder prompts do not)"
            )
        want = (p, hidden)
    if tuple(emb.shape) != want:
        raise PromptLoadError(f"{wfile}: prompt_embeddings has shape {tuple(emb.shape)}, this model needs {want} "
                              f"({layers} layers, {hkv} kv heads, head dim {dh}, hidden {hidden})")
    head = {}
    for k, v in tensors.items():
        if k.startswith("base_model.") and not k.startswith("base_model.model."):
            head[k.removeprefix("base_model.")] = v
    config = PromptConfig(method=method, num_tokens=p, peft_positions=peft_positions, train_head=bool(head) or _task_type(model) != "CAUSAL_LM")
    current = {f"{n}.{k}": v for n in set(k.split(".")[0] for k in head) for k, v in getattr(model, n, nn.Module()).state_dict().items()}
    if set(current) != set(head) or any(tuple(current[k].shape) != tuple(v.shape) for k, v in head.items()):
        raise PromptLoadError(f"{wfile}: head tensors { {k: tuple(v.shape) for k, v in head.items()} } do not match "
                              f"the model's { {k: tuple(v.shape) for k, v in current.items()} }")

    patch(model, config)
    runtime = patched_runtime(model)
    model = unwrap(model)
    runtime.method.from_peft(runtime.prompts, emb)
    with torch.no_grad():
        for k, v in head.items():
            name, rest = k.split(".", 1)
            getattr(model, name).state_dict(keep_vars=True)[rest].copy_(v)
    for p_ in prompt_parameters(model):
        p_.requires_grad_(trainable)
    return model


def to_peft(model: nn.Module, path: str | os.PathLike, *, task: int | None = None, base_model_name_or_path: str | None = None) -> Path:
    """Writes a patched model's prompt as a PEFT adapter directory `peft.PeftModel.from_pretrained` loads.

    ptv2 at start_layer 0 -> PREFIX_TUNING (the folded prefix); method="prompt" on a decoder ->
    PROMPT_TUNING. A bank needs `task`. PEFT's outputs equal fastprompt's when the model was
    patched with peft_positions=True (and for input prompts on rotary models in any case).
    """
    runtime = patched_runtime(model)
    model = unwrap(model)
    config = runtime.config
    _single_stack(model, "to_peft")  # refuses T5's two stacks
    if config.num_tasks > 1 and task is None:
        raise ValueError(f"this model holds {config.num_tasks} prompts: pass task= (PEFT adapters hold one)")
    t = 0 if task is None else task
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < config.num_tasks:
        raise ValueError(f"task must be in [0, {config.num_tasks}), got {task!r}")
    layers, hkv, p = runtime.shape.stack_layers[0], runtime.shape.kv_heads, config.num_tokens
    common = {
        "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path or getattr(model.config, "_name_or_path", None) or None,
        "inference_mode": True, "num_attention_heads": hkv, "num_layers": layers, "num_transformer_submodules": 1,
        "num_virtual_tokens": p, "peft_version": None, "revision": None, "task_type": _task_type(model),
        "modules_to_save": list(runtime.head_names) or None,
    }
    emb, fields = runtime.method.to_peft(runtime.prompts, t)
    cfg = {**common, "peft_type": runtime.method.peft_type, **fields}
    tensors = {"prompt_embeddings": emb.float().cpu().contiguous()}
    for name in runtime.head_names:
        head = getattr(model, name)
        for k, v in head.state_dict().items():
            if config.heads:
                v = v[t, : config.heads[t][1]]
            tensors[f"base_model.{name}.{k}"] = v.detach().cpu().contiguous()
    cfg["peft_version"] = f"fastprompt-{__version__}"
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / ADAPTER_WEIGHTS, safetensors.torch.save(tensors))
    atomic_write(out / ADAPTER_CONFIG, (json.dumps(cfg, indent=2) + "\n").encode())
    return out
