"""The prompt methods, one module each, and their registry (`REGISTRY`, `method_class`,
`method_names`): ptv2 (deep_prefix.py), prompt (input_prompt.py), lpt (late_prompt.py)."""

from . import deep_prefix, input_prompt, late_prompt  # noqa: F401  (each registers its class)
from .base import REGISTRY, Method, method_class, method_names

__all__ = ["REGISTRY", "Method", "method_class", "method_names"]
