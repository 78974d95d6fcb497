"""Batched generation for evaluation and `fastprompt predict`: left-padded prompts, greedy decoding
(or beam search), stopped at the model's end-of-sequence tokens, decoded to text."""

from __future__ import annotations

import torch
from transformers import GenerationConfig


def stop_tokens(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and the model's generation_config EOS ids (chat models end a turn with their own)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return sorted({i for i in ids if isinstance(i, int)})


def generate_texts(model, tokenizer, encoder, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
                   num_beams: int = 1) -> list[str]:
    """One decoded completion (special tokens dropped, stripped) per prompt (token ids), in order.

    The model is put in eval mode for the call (train mode restored). Its own generation_config's
    sampling settings are not used: decoding is greedy, or beam search with num_beams > 1.
    """
    config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                              pad_token_id=encoder.pad, eos_token_id=stop_tokens(model, tokenizer) or None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts = []
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                batch = encoder.pad_left(prompts[i : i + batch_size])
                batch = {k: v.to(device) for k, v in batch.items()}
                out = model.generate(**batch, generation_config=config)
                new = out[:, batch["input_ids"].shape[1]:]
                texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return texts
