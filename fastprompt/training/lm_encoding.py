"""Encoding generation examples for a causal LM: prompt + completion + EOS, loss on the completion only.

- Plain pairs: the prompt is the template with the source in place of `{source}` (default
  `Input: {source}\\nOutput:`); the completion follows after a space (unless the prompt ends in
  whitespace) and ends with EOS. Chat: the tokenizer's chat template renders the conversation
  (a plain `role: content` layout, EOS after each assistant turn, when it has none); every assistant
  turn, with the template's end-of-turn text, is completion.
- Labels are the input ids on completion tokens and -100 on prompt and padding tokens.
- Truncation never cuts the completion's start: the completion keeps min(its length, M // 2) of the
  M = max_length tokens; the prompt gets the rest (its source is cut at the end, so the template's
  own text stays; a chat is cut from the left); the completion then fills what is left. At
  generation the completion's length is max_new_tokens.
- Training batches pad on the right, generation batches on the left.
"""

from __future__ import annotations

import torch

from .errors import SettingsError
from .text_pairs import TextPair

DEFAULT_TEMPLATE = "Input: {source}\nOutput:"


def render_chat(tokenizer, turns, add_generation_prompt: bool) -> str:
    """The conversation as text: the tokenizer's chat template, or without one `role: content` lines
    with EOS ending each assistant turn (so a model learns where its answer stops)."""
    messages = [{"role": r, "content": c} for r, c in turns]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    eos = tokenizer.eos_token or "\n"
    text = "".join(f"{r}: {c}" + (eos if r == "assistant" else "\n") for r, c in turns)
    return text + ("assistant:" if add_generation_prompt else "")


class LMEncoder:
    """Turns TextPairs into token ids and labels for one tokenizer, template and max_length."""

    def __init__(self, tokenizer, template: str | None, max_length: int, chat: bool = False):
        self.tokenizer, self.max_length, self.chat = tokenizer, max_length, chat
        self.template = template or DEFAULT_TEMPLATE
        if "{source}" not in self.template:
            raise SettingsError(f"--template must contain {{source}} where the input goes, got {self.template!r}")
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        fixed = len(self._prompt_ids("")) if not chat else len(self._ids(render_chat(tokenizer, [("user", "")], True), True))
        if fixed + 1 > max_length:
            raise SettingsError(f"--max-length {max_length} is shorter than the prompt template ({fixed} tokens) plus one completion token")

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _prompt_ids(self, source: str) -> list[int]:
        return self._ids(self.template.replace("{source}", source), True)

    def prompt(self, source: str, budget: int) -> list[int]:
        """The template around the source, the source cut at its end until it fits in budget tokens."""
        ids = self._prompt_ids(source)
        while len(ids) > budget and source:
            src = self._ids(source, False)
            keep = max(len(src) - (len(ids) - budget), 0)
            source = self.tokenizer.decode(src[:keep]) if keep else ""
            ids = self._prompt_ids(source)
        return ids

    def _completion_ids(self, prompt_text_end: str, target: str) -> list[int]:
        sep = "" if not prompt_text_end or prompt_text_end[-1].isspace() else " "
        return self._ids(sep + target, False) + ([self.eos] if self.eos is not None else [])

    def _room(self, completion_length: int) -> int:
        """Tokens the completion is sure to keep."""
        return min(completion_length, self.max_length // 2)

    def train_example(self, pair: TextPair) -> tuple[list[int], list[int]]:
        """(ids, labels) of one example, at most max_length long."""
        if pair.messages is not None:
            return self._chat_example(pair)
        completion = self._completion_ids(self.template, pair.target)
        prompt = self.prompt(pair.source, self.max_length - self._room(len(completion)))
        completion = completion[: self.max_length - len(prompt)]
        return prompt + completion, [-100] * len(prompt) + completion

    def _chat_example(self, pair: TextPair) -> tuple[list[int], list[int]]:
        """Segments of the rendered conversation, each assistant turn labelled."""
        turns, text, ids, labels = pair.messages, "", [], []
        for i, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            before = render_chat(self.tokenizer, turns[:i], True)
            through = render_chat(self.tokenizer, turns[: i + 1], False)
            if not (before.startswith(text) and through.startswith(before)):
                raise SettingsError("the tokenizer's chat template does not render earlier turns as a prefix of later ones; "
                                    "use prompt/completion data instead of messages")
            context = self._ids(before[len(text):], not text)
            answer = self._ids(through[len(before):], False)
            ids += context + answer
            labels += [-100] * len(context) + answer
            text = through
        # the last assistant turn is the completion: keep its start, cut the conversation from the left
        answer_len = len(self._ids(through[len(before):], False))
        start = len(ids) - answer_len
        keep_prompt = self.max_length - min(self._room(answer_len), self.max_length)
        cut = max(start - keep_prompt, 0)
        ids, labels = ids[cut:][: self.max_length], labels[cut:][: self.max_length]
        return ids, labels

    def generation_prompt(self, pair: TextPair, max_new_tokens: int) -> list[int]:
        """The ids generation starts from (the completion's room is max_new_tokens)."""
        budget = self.max_length - self._room(max_new_tokens)
        if pair.messages is not None or not isinstance(pair.source, str):
            ids = self._ids(render_chat(self.tokenizer, pair.source, True), True)
            return ids[-budget:]
        return self.prompt(pair.source, budget)

    def completion_length(self, target: str) -> int:
        return len(self._completion_ids(self.template, target))

    def pad_right(self, examples: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Training batch: input_ids, attention_mask, labels (B, T), padded on the right."""
        t = max(len(i) for i, _ in examples)
        ids = torch.full((len(examples), t), self.pad, dtype=torch.long)
        labels = torch.full((len(examples), t), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), t), dtype=torch.long)
        for row, (i, y) in enumerate(examples):
            ids[row, : len(i)] = torch.tensor(i)
            labels[row, : len(y)] = torch.tensor(y)
            mask[row, : len(i)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def pad_left(self, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        """Generation batch: input_ids, attention_mask (B, T), padded on the left."""
        t = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), t), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), t), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, t - len(p):] = torch.tensor(p)
            mask[row, t - len(p):] = 1
        return {"input_ids": ids, "attention_mask": mask}
