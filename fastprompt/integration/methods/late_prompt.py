"""LatePromptMethod (lpt, Late Prompt Tuning): a generator per task makes each example's prompt
tokens from the hidden states entering layer start_layer, inserted there (insertion.py)."""

from __future__ import annotations

import torch

from .. import prompts as modules
from ..insertion import install_insertion
from .base import Method


class LatePromptMethod(Method):
    """Late Prompt Tuning: a generator per task makes each example's prompt at layer start_layer."""

    name = "lpt"
    reads_input = grows_sequence = True
    accepts_init_text = accepts_peft_positions = False

    @classmethod
    def shapes(cls, config, shape):
        r, h, p = config.generator_hidden, shape.hidden, config.num_tokens
        up = p * h if config.generator == "npg" else h
        one = {"down.weight": (r, h), "down.bias": (r,), "up.weight": (up, r), "up.bias": (up,)}
        return {f"generators.{i}.{k}": v for i in range(config.num_tasks) for k, v in one.items()}

    def build(self):
        c = self.config
        return modules.LatePromptBank(self.shape.hidden, c.num_tokens, c.generator, c.generator_hidden, c.num_tasks)

    def install(self, runtime):
        first = self.stacks[0]

        def make_tokens(runtime, hs, real, source):
            ids = runtime.forward.prompt_ids
            return runtime.prompts(hs, real, source, None if ids is None else ids.to(hs.device))

        install_insertion(runtime, first, self.config.start_layer, self.config.num_tokens, make_tokens, first.rotary)

    # a bank is `generators.<t>.*`; a single-task state is `generators.0.*`
    def task_state(self, prompts, task):
        head = f"generators.{task}."
        return {f"generators.0.{k[len(head):]}": v for k, v in prompts.state_dict().items() if k.startswith(head)}

    def load_task_state(self, prompts, tensors, task):
        with torch.no_grad():
            for k, p in prompts.generators[task].state_dict(keep_vars=True).items():
                p.copy_(tensors[f"generators.0.{k}"])

    def grow(self, prompts):
        ref = prompts.generators[0].down.weight
        gen = modules.LatePromptGenerator(*prompts.args).to(device=ref.device, dtype=ref.dtype)
        prompts.generators.append(gen.requires_grad_(True))
