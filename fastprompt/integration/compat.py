"""What differs between the transformers releases we support (see pyproject.toml).

transformers 5.24 renamed the KV cache from `past_key_values` to `cache` (layer arguments and
model outputs; the old name warns until its removal in 5.40). Code here finds the cache by its
type, so it reads both spellings and any later one.
"""

from __future__ import annotations

from transformers.cache_utils import Cache


def find_cache(args: tuple, kwargs: dict) -> Cache | None:
    """The KV cache a layer was called with, whatever its argument name or position."""
    for value in (*kwargs.values(), *args):
        if isinstance(value, Cache):
            return value
    return None


def output_cache(output) -> Cache | None:
    """The cache a model output carries (`cache` from 5.24, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    # ModelOutput is a dict: reading the key avoids 5.24's deprecation property of the same name
    return output.get("past_key_values") if cache is None else cache
