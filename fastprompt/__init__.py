"""fastprompt: fast, memory-lean deep prompt tuning for Hugging Face transformers models."""

__version__ = "0.1.0"

from .api import cache_lower_layers, patch, prompt_config, prompt_parameters, unpatch  # noqa: E402
from .banks import add_task  # noqa: E402
from .config import PromptConfig  # noqa: E402
from .integration.architectures import SUPPORTED, UnsupportedModelError  # noqa: E402
from .ops import explain_backend, prefix_attention  # noqa: E402
from .peft_io import from_peft, to_peft  # noqa: E402
from .planner import plan  # noqa: E402
from .serialization import PromptLoadError, load_prompts, save_prompts  # noqa: E402

__all__ = [
    "PromptConfig", "PromptLoadError", "SUPPORTED", "UnsupportedModelError", "add_task", "cache_lower_layers", "explain_backend",
    "from_peft", "load_prompts", "patch", "plan",
    "prefix_attention", "prompt_config", "prompt_parameters", "save_prompts", "to_peft", "unpatch",
]
