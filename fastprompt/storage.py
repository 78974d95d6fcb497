"""Files on disk: atomic writes, JSON reading, and the error every load raises.

Saves never leave half a file (temp file, fsync, rename); loads read only JSON and safetensors
and fail with `PromptLoadError` naming the file and what was expected there.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


class PromptLoadError(ValueError):
    """A saved prompt cannot be loaded into this model; the message says why."""


def read_json_object(f: Path, expected: str) -> dict:
    """A JSON object from file f, or PromptLoadError naming the file and what was expected there."""
    if not f.is_file():
        raise PromptLoadError(f"{f}: no such file (expected {expected})")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PromptLoadError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise PromptLoadError(f"{f}: expected a JSON object")
    return meta


def atomic_write(path: Path, data: bytes) -> None:
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
