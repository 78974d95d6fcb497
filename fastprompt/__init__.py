"""fastprompt: fast, memory-lean deep prompt tuning for Hugging Face transformers models."""

from .api import cache_lower_layers, patch, prompt_config, prompt_parameters, unpatch
from .banks import add_task
from .config import PromptConfig
from .integration.facade import SUPPORTED, UnsupportedModelError
from .ops import explain_backend, prefix_attention
from .peft_io import from_peft, to_peft
from .planner import plan
from .serialization import PromptLoadError, load_prompts, save_prompts
from .version import __version__  # noqa: F401  (fastprompt.__version__)

__all__ = [
    "PromptConfig", "PromptLoadError", "SUPPORTED", "UnsupportedModelError", "add_task", "cache_lower_layers", "explain_backend",
    "from_peft", "load_prompts", "patch", "plan",
    "prefix_attention", "prompt_config", "prompt_parameters", "save_prompts", "to_peft", "unpatch",
]
