"""Training checkpoints: prompts + optimizer + scheduler + step + RNG, resumable, never pickled.

A checkpoint directory holds one sub-directory per save (`step-00000123/`) and a `latest.json`
pointer written atomically after the save is complete, so a run killed mid-save resumes from
the previous checkpoint. Each save holds the prompts (`save_prompts` format, reparam weights
included), `optimizer.safetensors` (the optimizer's tensors) and `state.json` (everything else:
the optimizer's scalars and param groups, the scheduler's state, the step, RNG states and the
caller's own JSON state) with the tensor file's checksum.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn

from ..serialization import load_prompts, save_prompts
from ..storage import PromptLoadError, atomic_write

POINTER = "latest.json"
STATE = "state.json"
TENSORS = "optimizer.safetensors"


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        _, idx, k = name.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for name, v in meta["scalars"].items():
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path, model: nn.Module, optimizer=None, scheduler=None, step: int = 0, state: dict | None = None, keep: int = 2) -> Path:
    """Saves a resumable training state under directory `path`; returns the new save's folder.

    state: the caller's own JSON-serialisable values (epoch, data position, best metric...).
    The torch CPU (and CUDA) RNG states are stored, so dropout continues identically. Keeps the
    newest `keep` saves.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"step-{step:08d}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    save_prompts(model, folder / "prompts", reparam_weights=True)
    tensors, opt_meta = _flatten_optimizer(optimizer.state_dict()) if optimizer is not None else ({}, None)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    blob = safetensors.torch.save(tensors)
    meta = {
        "step": step,
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "state": state or {},
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
    }
    atomic_write(folder / TENSORS, blob)
    atomic_write(folder / STATE, (json.dumps(meta, indent=1) + "\n").encode())
    atomic_write(root / POINTER, (json.dumps({"latest": folder.name, "step": step}) + "\n").encode())
    saves = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in saves[: max(len(saves) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def read_checkpoint(path) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """Validates a checkpoint directory: (save folder, state.json, tensors). Touches nothing."""
    root = Path(path)
    pointer = root / POINTER
    if not pointer.is_file():
        raise PromptLoadError(f"{pointer}: no such file (expected a checkpoint directory written by save_checkpoint)")
    try:
        folder = root / json.loads(pointer.read_text())["latest"]
        meta = json.loads((folder / STATE).read_text())
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise PromptLoadError(f"{root}: damaged checkpoint ({e})") from None
    missing = {"step", "optimizer", "scheduler", "state", "tensors_sha256"} - set(meta)
    if missing:
        raise PromptLoadError(f"{folder / STATE}: missing fields {sorted(missing)}")
    blob = (folder / TENSORS).read_bytes() if (folder / TENSORS).is_file() else b""
    if hashlib.sha256(blob).hexdigest() != meta["tensors_sha256"]:
        raise PromptLoadError(f"{folder / TENSORS}: missing or does not match its checksum")
    return folder, meta, safetensors.torch.load(blob)


def load_checkpoint(path, model: nn.Module, optimizer=None, scheduler=None) -> dict:
    """Restores what save_checkpoint wrote: prompts (trainable), optimizer, scheduler, RNG.

    Build the optimizer over `prompt_parameters(model)` after this call's prompts are in place,
    or pass it here: its tensors are loaded into the same parameters. Returns
    {"step": int, "state": the caller's state}.
    """
    folder, meta, tensors = read_checkpoint(path)
    if optimizer is not None and meta["optimizer"] is None:
        raise PromptLoadError(f"{folder}: saved without optimizer state")
    load_prompts(model, folder / "prompts", trainable=True)
    if optimizer is not None:
        opt_tensors = {k: v for k, v in tensors.items() if k.startswith("state.")}
        optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, meta["optimizer"]))
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return {"step": meta["step"], "state": meta["state"]}


def checkpoint_exists(path) -> bool:
    return (Path(path) / POINTER).is_file()


__all__ = ["checkpoint_exists", "load_checkpoint", "read_checkpoint", "save_checkpoint"]
