"""Building a model directly in 8-bit or 4-bit, one tensor at a time.

`build_quantized(config, source, bits=8)` creates the model's skeleton on the meta device (no
memory), then fills it: every nn.Linear inside the transformer layers is read from `source` in
float, quantised (bitsandbytes: int8 rows with one scale each, or nf4 blocks of 64) and dropped,
one at a time; every other tensor (embeddings, norms, lm_head) is read in `dtype`. The float copy
of the whole model never exists, so a model whose float weights would not fit in memory loads
into what its quantised weights need. `source(name, shape, dtype) -> tensor` is either
`safetensors_source(folder)` (a real checkpoint, read shard by shard, tensor by tensor through
safetensors' lazy `safe_open`) or `random_source(seed)` (random weights, for benchmarks).
A source may return None for a tensor the checkpoint lacks (a fresh task head, or one whose shape
differs): that module is then initialised as transformers initialises missing weights.

`load_quantized(folder, auto_class, bits, **config_kwargs)` is what `fastprompt train --int8/--int4`
uses for a local checkpoint: transformers' own bitsandbytes load keeps the checkpoint's float pages
mapped (on a 135M fp32 decoder it peaks above the float model it replaces), this does not.
"""

from __future__ import annotations

import gc
import json
import zlib
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

Source = Callable[[str, tuple, torch.dtype], torch.Tensor]


def random_source(seed: int = 0, std: float = 0.02) -> Source:
    """Random weights like a fresh init: N(0, std) matrices and embeddings, unit norm weights, zero biases."""
    def source(name, shape, dtype):
        g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
        if name.endswith("bias"):
            return torch.zeros(shape, dtype=dtype)
        if "norm" in name or "ln_" in name:
            return torch.ones(shape, dtype=dtype)
        return (torch.randn(shape, generator=g, dtype=torch.float32) * std).to(dtype)

    return source


def has_safetensors(folder) -> bool:
    folder = Path(folder)
    return folder.is_dir() and ((folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file())


def safetensors_source(folder, base_prefix: str | None = None, missing_ok: bool = False) -> Source:
    """Tensors of a checkpoint folder (model.safetensors, or shards listed in model.safetensors.index.json),
    each read on its own when asked for.

    base_prefix: the model's base_model_prefix ("bert", "model"): a checkpoint of the bare base model
    (keys without it) feeds a model with a head, and the other way round, as from_pretrained allows.
    missing_ok: a tensor the checkpoint lacks, or holds in another shape, gives None (initialised
    fresh by build_quantized) instead of an error.
    """
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", "pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")

    def stored_name(name):
        if name in weight_map or not base_prefix:
            return name
        head = base_prefix + "."
        other = name[len(head):] if name.startswith(head) else head + name
        return other if other in weight_map else name

    def source(name, shape, dtype):
        key = stored_name(name)
        if key not in weight_map:
            if missing_ok:
                return None
            raise KeyError(f"{folder}: the checkpoint has no tensor {name!r}")
        with safe_open(folder / weight_map[key], "pt") as f:
            t = f.get_tensor(key)
        if tuple(t.shape) != tuple(shape):
            if missing_ok:
                return None
            raise ValueError(f"{folder}: {name} has shape {tuple(t.shape)}, the model expects {tuple(shape)}")
        return t.to(dtype)

    return source


def _quantised_linear(linear: nn.Linear, weight: torch.Tensor, bias, bits: int, compute_dtype, device="cpu"):
    import bitsandbytes as bnb

    if bits == 8:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias is not None, has_fp16_weights=False,
                                threshold=0.0, device="meta")
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)  # quantises
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias is not None, compute_dtype=compute_dtype,
                              quant_type="nf4", device="meta")
        # no double quantisation of the absmax: transformers' BitsAndBytesConfig default
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=False, module=q).to(device)
    if bias is not None:
        q.bias = nn.Parameter(bias.to(device), requires_grad=False)
    return q


def build_quantized(config, source: Source, bits: int = 8, auto_class=None, dtype: torch.dtype = torch.bfloat16,
                    progress: Callable[[int, int], None] | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """A transformers model with int8 (bits=8) or nf4 (bits=4) transformer-layer linears, built tensor by tensor.

    config: a transformers config; source: see the module docstring; auto_class: default
    AutoModelForCausalLM; dtype: of everything not quantised. progress(i, n) is called after
    each layer. Peak memory is the quantised model plus one float tensor. device: where the
    linears are quantised and kept ("cuda" quantises on the GPU; move the rest with `.to`).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    from transformers import AutoModelForCausalLM

    from .integration.facade import spec_for

    auto_class = auto_class or AutoModelForCausalLM
    with torch.device("meta"):
        model = auto_class.from_config(config, dtype=dtype)
    names = {id(m): n for n, m in model.named_modules()}
    layers = [(names[id(layer)], layer) for s in spec_for(model).stacks(model) for layer in s.layers]
    for n, (prefix, layer) in enumerate(layers):
        for mname, module in list(layer.named_modules()):
            if isinstance(module, nn.Linear):
                full = f"{prefix}.{mname}"
                w = source(f"{full}.weight", tuple(module.weight.shape), torch.float16 if bits == 8 else dtype)
                b = source(f"{full}.bias", tuple(module.bias.shape), dtype) if module.bias is not None else None
                parent, attr = _parent(layer, mname)
                setattr(parent, attr, _quantised_linear(module, w, b, bits, dtype, device))
                del w
        if _fill(layer, prefix, source, dtype):
            raise ValueError(f"the checkpoint lacks tensors of transformer layer {prefix}")
        gc.collect()
        if progress is not None:
            progress(n + 1, len(layers))
    fresh = _fill(model, "", source, dtype)
    for module in fresh:  # tensors the checkpoint lacks: initialised as from_pretrained does
        model._init_weights(module)
    _rebuild_meta_buffers(model)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def _parent(root, dotted):
    parts = dotted.split(".")
    for p in parts[:-1]:
        root = getattr(root, p)
    return root, parts[-1]


def _fill(root: nn.Module, prefix: str, source: Source, dtype) -> list[nn.Module]:
    """Materialises every parameter of root still on the meta device from source; returns the
    modules whose tensors the source lacked (allocated, not yet initialised)."""
    fresh = []
    for name, p in list(root.named_parameters()):
        if p.device.type != "meta":
            continue
        full = f"{prefix}.{name}" if prefix else name
        if full.endswith("lm_head.weight") and getattr(getattr(root, "config", None), "tie_word_embeddings", False):
            continue  # tied to the input embeddings below
        parent, attr = _parent(root, name)
        value = source(full, tuple(p.shape), dtype)
        if value is None:
            value = torch.empty(tuple(p.shape), dtype=dtype)
            if parent not in fresh:
                fresh.append(parent)
        setattr(parent, attr, nn.Parameter(value, requires_grad=False))
    return fresh


def _rebuild_meta_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary inverse frequencies, BERT's position ids) are computed, not
    loaded: taken from a fresh CPU instance of their module, whose parameters are dropped."""
    for module in list(model.modules()):
        meta = [n for n, b in module.named_buffers(recurse=False) if b.device.type == "meta"]
        if meta:
            with torch.device("cpu"):
                fresh = type(module)(config=model.config)
            for n in meta:
                module._buffers[n] = fresh._buffers[n]

def load_quantized(folder, auto_class, bits: int = 8, dtype: torch.dtype = torch.float32, device="cpu", **config_kwargs) -> nn.Module:
    """A checkpoint folder with safetensors weights, loaded as `auto_class` with int8/nf4 transformer
    linears, tensor by tensor (build_quantized). config_kwargs go to AutoConfig (num_labels, ...); a
    head the checkpoint lacks or holds in another size is initialised fresh, as
    from_pretrained(..., ignore_mismatched_sizes=True) does."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, **config_kwargs)
    prefix = getattr(auto_class, "base_model_prefix", None) or _base_prefix(auto_class, config)
    return build_quantized(config, safetensors_source(folder, prefix, missing_ok=True), bits=bits, auto_class=auto_class,
                           dtype=dtype, device=device)


def _base_prefix(auto_class, config) -> str | None:
    # auto classes do not carry base_model_prefix; the concrete class they map this config to does
    mapping = getattr(auto_class, "_model_mapping", None)
    try:
        return mapping[type(config)].base_model_prefix if mapping is not None else None
    except KeyError:
        return None
