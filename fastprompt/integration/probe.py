"""The probe forward `patch` ends with: a model whose attention never reached the registered
function (it routes attention elsewhere) is refused instead of silently running without prompts."""

from __future__ import annotations

import inspect

import torch

from .architectures import UnsupportedModelError


def probe(model, runtime) -> None:
    """One tiny no-grad forward: every bound module must have been called through our function."""
    params = inspect.signature(model.forward).parameters
    device = next(model.parameters()).device
    # a row as tokenizers make them: T5ForSequenceClassification pools at the end-of-sequence token
    # and refuses rows without one
    vocab = model.get_input_embeddings().weight.shape[0]
    eos = getattr(model.config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    last = eos if isinstance(eos, int) and 0 <= eos < vocab else 3
    inputs = {"input_ids": torch.tensor([[4, 5, last]], device=device) % vocab}
    if "decoder_input_ids" in params:  # as long as the input: T5ForSequenceClassification reads its eos there
        inputs["decoder_input_ids"] = torch.zeros_like(inputs["input_ids"])
    if runtime.config.num_tasks > 1:
        inputs["prompt_ids"] = torch.zeros(1, dtype=torch.long, device=device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        model.train(was)
    silent = [m for m in runtime.bound if m.__dict__["_fastprompt"].calls == 0]
    if silent:
        raise UnsupportedModelError(
            f"fastprompt.patch: {type(model).__name__} did not call the registered attention function in "
            f"{len(silent)} of {len(runtime.bound)} self-attention modules ({type(silent[0]).__name__}); "
            "this architecture does not route attention through transformers' AttentionInterface"
        )
