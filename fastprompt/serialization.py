"""save_prompts / load_prompts: `prompts.safetensors` + `fastprompt.json`, written atomically.

Only safetensors and JSON are ever read (no pickle, nothing executed from a file). A load checks
the JSON, the model fingerprint, the tensor file's checksum, names, shapes and dtypes before it
changes anything in the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn

from . import __version__
from .api import _runtime, patch
from .config import PromptConfig
from .integration.architectures import fingerprint
from .integration.patching import head_shapes, prompt_shapes, runtime_of

TENSORS_FILE = "prompts.safetensors"
CONFIG_FILE = "fastprompt.json"
FORMAT_VERSION = 1
_JSON_FIELDS = {"format_version", "library_version", "method", "num_tokens", "start_layer", "dtype", "config", "fingerprint", "heads", "tensors_sha256"}


def _atomic_write(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename: a reader sees the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save_prompts(model: nn.Module, path: str | os.PathLike) -> Path:
    """Writes the prompt (and trained head) of a patched model to directory `path`; returns it."""
    runtime = _runtime(model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"prompt.{k}": v.detach().cpu().contiguous() for k, v in runtime.prompts.state_dict().items()}
    for name in runtime.head_names:
        for k, v in getattr(model, name).state_dict().items():
            tensors[f"head.{name}.{k}"] = v.detach().cpu().contiguous()
    blob = safetensors.torch.save(tensors)
    cfg = runtime.config
    meta = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "method": cfg.method,
        "num_tokens": cfg.num_tokens,
        "start_layer": cfg.start_layer,
        "dtype": str(next(runtime.prompts.parameters()).dtype).removeprefix("torch."),
        "config": cfg.to_dict(),
        "fingerprint": runtime.fingerprint,
        "heads": list(runtime.head_names),
        # the JSON is written last and names the tensors it belongs to: a save cut between the two
        # renames is detected at load instead of pairing an old config with new tensors
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
    }
    _atomic_write(out / TENSORS_FILE, blob)
    _atomic_write(out / CONFIG_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return out


class PromptLoadError(ValueError):
    """A saved prompt cannot be loaded into this model; the message says why."""


def read_prompt_config(path: str | os.PathLike) -> tuple[PromptConfig, dict]:
    """Parses and validates `fastprompt.json` in `path`: (config, the whole JSON)."""
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise PromptLoadError(f"{f}: no such file (expected a directory written by fastprompt.save_prompts)")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PromptLoadError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise PromptLoadError(f"{f}: expected a JSON object")
    missing, unknown = sorted(_JSON_FIELDS - set(meta)), sorted(set(meta) - _JSON_FIELDS)
    if missing or unknown:
        raise PromptLoadError(f"{f}: missing fields {missing}, unknown fields {unknown}")
    if meta["format_version"] != FORMAT_VERSION:
        raise PromptLoadError(f"{f}: format_version {meta['format_version']} is not {FORMAT_VERSION}")
    try:
        config = PromptConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise PromptLoadError(f"{f}: bad config: {e}") from None
    for k in ("method", "num_tokens", "start_layer"):
        if meta[k] != getattr(config, k):
            raise PromptLoadError(f"{f}: field {k}={meta[k]!r} disagrees with config.{k}={getattr(config, k)!r}")
    return config, meta


def _differences(saved: dict, current: dict) -> list[str]:
    return [f"{k}: saved {saved.get(k)!r}, model {current.get(k)!r}" for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def load_prompts(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Loads prompts saved by `save_prompts` into `model`, patching it first if it is not patched.

    Everything is validated before the model is changed: the JSON, the model fingerprint
    (architecture, layers, heads, kv heads, head dim, hidden size), an already-patched model's
    config, the tensor file's checksum, tensor names, shapes and dtypes.
    """
    config, meta = read_prompt_config(path)
    diffs = _differences(meta["fingerprint"], fingerprint(model))
    if diffs:
        raise PromptLoadError(f"{path}: prompts were saved for another model: " + "; ".join(diffs))
    runtime = runtime_of(model)
    if runtime is not None:
        diffs = _differences(config.prompt_fields(), runtime.config.prompt_fields())
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
    expected = {f"prompt.{k}": s for k, s in prompt_shapes(model, config).items()}
    expected.update({f"head.{k}": s for k, s in head_shapes(model, config).items() if k.split(".")[0] in meta["heads"]})
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        raise PromptLoadError(f"{tfile}: tensors {sorted(got.items())} do not match what this model expects {sorted(expected.items())}")
    bad = [k for k, v in tensors.items() if not v.is_floating_point()]
    if bad:
        raise PromptLoadError(f"{tfile}: tensors {bad} are not floating point")

    if runtime is None:
        patch(model, config)
        runtime = runtime_of(model)
    with torch.no_grad():
        for k, p in runtime.prompts.state_dict(keep_vars=True).items():
            p.copy_(tensors[f"prompt.{k}"])
        for name in meta["heads"]:
            for k, p in getattr(model, name).state_dict(keep_vars=True).items():
                p.copy_(tensors[f"head.{name}.{k}"])
    return model
