"""One class per prompt method, as PEFT's tuners own theirs: each builds its prompt module from the
config and the model's facts (with its own initialisation), knows the state_dict shapes it will hold
(so loads validate before building anything), installs itself into the model, moves one task of a
bank in and out, grows a bank by a task, and converts to and from PEFT where PEFT has an equivalent.

- `DeepPrefixMethod` (ptv2): a K/V prefix slot in every self-attention layer >= start_layer.
- `InputPromptMethod` (prompt): embeddings at the input. On a causal stack the P prompt tokens precede
  every real token and see none of them, so each layer's prompt K/V are a function of the prompt
  alone: computed once per forward by running the frozen stack on the P prompt embeddings (once
  in all at inference) and used as that layer's prefix. On a bidirectional stack the tokens are
  inserted ahead of layer 0 (insertion.py).
- `LatePromptMethod` (lpt): tokens generated per example from the hidden states entering layer L and
  inserted there (insertion.py).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from . import prompts as modules
from .architectures import Stack
from .back_references import weak_hook
from .compat import output_cache
from .insertion import install_insertion
from .runtime import bind
from .text_init import prefill_key_values


class Method:
    """The common part: construction arguments and the bank layout of modules whose task tensors
    are named by `task_dim_keys` (a leading task dimension)."""

    name = ""
    mode = ""  # how the attention function reads the prompt: "prefix" | "prompt_kv" | "insert"
    reads_input = False  # the prompt is made from each input's hidden states (late prompts)
    peft_type: str | None = None  # the PEFT adapter type with the same numerics, if any

    def __init__(self, model: nn.Module, config, stacks: list[Stack], fp: dict, absolute_positions: bool = False,
                 init_ids: torch.Tensor | None = None):
        """init_ids: (P,) token ids of config.init_text (text_init.init_text_ids), or None."""
        self._model = weakref.ref(model)  # the model holds its runtime, which holds this method
        self.config, self.stacks, self.fp = config, stacks, fp
        self.absolute_positions = absolute_positions
        self.init_ids = init_ids
        self.check()

    @property
    def model(self) -> nn.Module:
        return self._model()

    def check(self) -> None:
        """Raises ValueError for a config this method cannot run on this model."""
        if self.config.peft_positions and self.config.start_layer != 0:
            raise ValueError(f"peft_positions reproduces PEFT, whose prefixes start at layer 0; got start_layer={self.config.start_layer}")

    @classmethod
    def shapes(cls, config, stacks: list[Stack], fp: dict) -> dict[str, tuple[int, ...]]:
        """The prompt module's state_dict shapes for `config`, without building it."""
        raise NotImplementedError

    def build(self) -> nn.Module:
        raise NotImplementedError

    def install(self, runtime) -> None:
        """Binds the model's attention modules and adds the hooks this method needs."""
        raise NotImplementedError

    # ---- banks

    def task_state(self, prompts: nn.Module, task: int) -> dict[str, torch.Tensor]:
        """One task's tensors in a single-task module's layout (state_dict keys)."""
        keys = prompts.task_dim_keys
        return {k: (v[task : task + 1] if k in keys else v) for k, v in prompts.state_dict().items()}

    def load_task_state(self, prompts: nn.Module, tensors: dict[str, torch.Tensor], task: int) -> None:
        """Writes a single-task state (`task_state`'s layout, validated) into bank slot `task`."""
        keys = prompts.task_dim_keys
        with torch.no_grad():
            for k, p in prompts.state_dict(keep_vars=True).items():
                if k in keys:
                    p[task].copy_(tensors[k][0])
                else:
                    p.copy_(tensors[k])

    def new_task_row(self, key: str, old: torch.Tensor) -> torch.Tensor:
        """A fresh task's slice of the task tensor `key`: N(0, 1), as at patch time."""
        return torch.randn_like(old[:1])

    def grow(self, prompts: nn.Module) -> None:
        """Adds one freshly initialised task to the bank (new, larger parameters)."""
        for key in prompts.task_dim_keys:
            old = getattr(prompts, key, None)
            if old is None:
                continue
            row = self.new_task_row(key, old)
            setattr(prompts, key, nn.Parameter(torch.cat([old.detach(), row.to(old)]), requires_grad=True))

    # ---- PEFT

    def to_peft(self, prompts: nn.Module, task: int) -> tuple[torch.Tensor, dict]:
        """(prompt_embeddings (P, X), the adapter config's type-specific fields)."""
        raise ValueError(f"PEFT has no equivalent of method={self.name!r} on this model (ptv2 from layer 0, or input prompts on decoders)")

    def from_peft(self, prompts: nn.Module, embeddings: torch.Tensor) -> None:
        """Loads a PEFT adapter's prompt_embeddings (P, X) into task 0."""
        raise ValueError(f"PEFT adapters do not load into method={self.name!r}")


class DeepPrefixMethod(Method):
    """P-Tuning v2: per-layer key/value prefixes (optionally through the MLP reparameterisation)."""

    name, mode, peft_type = "ptv2", "prefix", "PREFIX_TUNING"

    @staticmethod
    def _slots(config, stacks) -> int:
        return sum(max(len(s.layers) - config.start_layer, 0) for s in stacks)

    @classmethod
    def shapes(cls, config, stacks, fp):
        t, p, n_slots = config.num_tasks, config.num_tokens, cls._slots(config, stacks)
        if not config.reparam:
            return {"prefix": (t, n_slots, 2, fp["kv_heads"], p, fp["head_dim"])}
        r, h = config.reparam_hidden, fp["hidden_size"]
        out = n_slots * 2 * fp["kv_heads"] * fp["head_dim"]
        return {"embedding": (t, p, h), "mlp.0.weight": (r, h), "mlp.0.bias": (r,), "mlp.2.weight": (out, r), "mlp.2.bias": (out,)}

    def build(self):
        c, fp = self.config, self.fp
        prefix = modules.DeepPrefix(
            self._slots(c, self.stacks), fp["kv_heads"], c.num_tokens, fp["head_dim"], fp["hidden_size"],
            reparam=c.reparam, reparam_hidden=c.reparam_hidden, dropout=c.prefix_dropout, num_tasks=c.num_tasks,
        )
        if self.init_ids is not None:
            self._from_text(prefix)
        elif c.prefix_init == "zero":
            with torch.no_grad():
                for p in ([prefix.mlp[2].weight, prefix.mlp[2].bias] if c.reparam else [prefix.prefix]):
                    p.zero_()
        return prefix

    def _from_text(self, prefix) -> None:
        """Every task's prefix = the frozen model's keys and values of the init text, layer by layer."""
        first, p = self.stacks[0], self.init_ids.numel()
        # rotary decoders: the text at -P..-1, right before real tokens that keep 0..T-1 (with PEFT's
        # shift the real tokens start at P instead, so the text keeps 0..P-1)
        shifted = first.causal and first.rotary is not None and not self.config.peft_positions
        kv = prefill_key_values(self.model, self.init_ids, torch.arange(-p, 0) if shifted else None)
        attns = [a for s in self.stacks for i, a in enumerate(s.self_attention) if i >= self.config.start_layer]
        with torch.no_grad():
            for slot, attn in enumerate(attns):
                k, v = kv[attn]
                prefix.prefix[:, slot, 0] = k.to(prefix.prefix)
                prefix.prefix[:, slot, 1] = v.to(prefix.prefix)

    def install(self, runtime):
        slot = 0
        for s in self.stacks:
            for i, attn in enumerate(s.self_attention):
                if i >= self.config.start_layer:
                    bind(runtime, attn, slot)
                    slot += 1

    def _peft_layout(self):
        fp = self.fp
        return self.config.num_tokens, fp["layers"][0], fp["kv_heads"], fp["head_dim"]

    def to_peft(self, prompts, task):
        if self.config.start_layer != 0:
            raise ValueError(f"PEFT prefixes cover every layer: start_layer must be 0, got {self.config.start_layer}")
        p, layers, hkv, dh = self._peft_layout()
        prefix = prompts.folded()[task].detach()  # (layers, 2, Hkv, P, D)
        emb = prefix.permute(3, 0, 1, 2, 4).reshape(p, layers * 2 * hkv * dh)
        return emb, {"token_dim": hkv * dh, "encoder_hidden_size": self.fp["hidden_size"], "prefix_projection": False}

    def from_peft(self, prompts, embeddings):
        p, layers, hkv, dh = self._peft_layout()
        with torch.no_grad():
            prompts.prefix.copy_(embeddings.view(p, layers, 2, hkv, dh).permute(1, 2, 3, 0, 4)[None])


def _embed_for_insertion(model, ids: torch.Tensor) -> torch.Tensor:
    """(P,) ids -> (P, hidden) in the space of the hidden states entering the first layer."""
    base = model.base_model
    with torch.no_grad():
        if hasattr(base, "embeddings"):  # BERT-like: word + position + type, LayerNorm
            was = base.embeddings.training
            base.embeddings.eval()
            out = base.embeddings(input_ids=ids[None])[0]
            base.embeddings.train(was)
            return out
        return model.get_input_embeddings()(ids)


class InputPromptMethod(Method):
    """Soft prompt tuning (Lester et al.): P embeddings at the input, per task."""

    name, peft_type = "prompt", "PROMPT_TUNING"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inserted = not self.stacks[0].causal
        self.mode = "insert" if self.inserted else "prompt_kv"
        if self.config.peft_positions and self.inserted:
            raise ValueError("peft_positions applies to ptv2, and to input prompts on decoders (PEFT inserts encoder prompts before the embeddings)")

    def check(self):
        if self.config.start_layer != 0:
            raise ValueError(f"start_layer must be 0 for method='prompt' (the prompt is at the input), got {self.config.start_layer}")
        super().check()

    @classmethod
    def shapes(cls, config, stacks, fp):
        return {"embedding": (config.num_tasks, config.num_tokens, fp["hidden_size"])}

    def initial(self, num_tasks: int) -> torch.Tensor:
        """(T, P, hidden): each task's prompt from init_token_ids or random vocabulary embeddings
        (through the embedding layer's norm on encoders, where the prompt enters after it)."""
        model, config = self.model, self.config
        emb = model.get_input_embeddings()
        vocab = emb.weight.shape[0]
        p = config.num_tokens
        rows = []
        given = self.init_ids if self.init_ids is not None else config.init_token_ids
        for _ in range(num_tasks):
            if given is not None:
                ids = torch.as_tensor(list(given), dtype=torch.long)
                if ids.numel() == 0 or ids.min() < 0 or ids.max() >= vocab:
                    raise ValueError(f"init_token_ids must be non-empty token ids in [0, {vocab}), got {list(config.init_token_ids)}")
                ids = ids.repeat((p + ids.numel() - 1) // ids.numel())[:p]  # cycle, as PEFT does for short label words
            else:
                ids = torch.randint(0, vocab, (p,))
            ids = ids.to(emb.weight.device)
            with torch.no_grad():
                rows.append((_embed_for_insertion(model, ids) if self.inserted else emb(ids)).float())
        return torch.stack(rows)

    def build(self):
        return modules.SoftPrompt(self.initial(self.config.num_tasks))

    def new_task_row(self, key, old):
        return self.initial(1)  # vocabulary init, as at patch time

    def install(self, runtime):
        first = self.stacks[0]
        if not self.inserted:
            self._install_prompt_kv(runtime, first)
            return

        def make_tokens(runtime, hs, real, source):
            soft, ids = runtime.prompts, runtime.prompt_ids
            if soft.num_tasks == 1 or ids is None:
                return soft.embedding[0][None].expand(hs.shape[0], -1, -1)
            return soft.embedding[ids.to(soft.embedding.device)]

        install_insertion(runtime, first, 0, self.config.num_tokens, make_tokens, first.rotary, bind)

    def _install_prompt_kv(self, runtime, stack: Stack) -> None:
        for i, attn in enumerate(stack.self_attention):
            bind(runtime, attn, i)

        def prehook(runtime, module, args, kwargs):
            if runtime.computing:
                return None
            soft, compute = runtime.prompts, runtime.method.prompt_key_values
            params = list(soft.parameters())
            ids = runtime.prompt_ids
            if torch.is_grad_enabled() and any(p.requires_grad for p in params) and ids is not None and soft.num_tasks > 1:
                # training: only the tasks present in the batch, ids re-indexed into them
                used, ids = torch.unique(ids, return_inverse=True)
                runtime.prompt_kv = (compute(runtime, used), ids)
            else:
                runtime.prompt_kv = (runtime._kv_cache.get(params, None, lambda: compute(runtime, None)), ids)
            return None

        # hooked on the stack's first layer (OPTForCausalLM calls model.decoder, never the base
        # model). Checkpointed layers get these K/V back for their recompute from a snapshot
        runtime.handles.append(stack.layers[0].register_forward_pre_hook(weak_hook(runtime, prehook), with_kwargs=True))

    def prompt_key_values(self, runtime, tasks):
        """Every layer's (K, V) of the prompts of `tasks` ((n,) ids, None = all), each (n, Hkv, P, D)."""
        model, base, soft = self.model, self.stacks[0].owner, runtime.prompts
        emb_w = model.get_input_embeddings().weight
        embeds = soft.embedding if tasks is None else soft.embedding[tasks]
        embeds = embeds.to(device=emb_w.device, dtype=emb_w.dtype if emb_w.is_floating_point() else torch.float32)
        n, p = embeds.shape[:2]
        # rotary models: prompt at positions -P..-1 so real tokens keep 0..T-1
        start = 0 if self.absolute_positions else -p
        pos = torch.arange(start, start + p, device=emb_w.device)[None].expand(n, -1)
        # transformers' gradient checkpointing (gradient_checkpointing_enable()) makes the stack turn
        # use_cache off in training; this P-token pass exists to fill a cache, and its layers run
        # unwrapped (truncation.py's bypass), so only the stack's own flag is in the way
        hf_checkpointing = getattr(base, "gradient_checkpointing", False)
        runtime.computing = True
        base.gradient_checkpointing = False
        try:
            out = base(inputs_embeds=embeds, position_ids=pos, use_cache=True)
        finally:
            runtime.computing = False
            base.gradient_checkpointing = hf_checkpointing
        cache = output_cache(out)
        return [(layer.keys, layer.values) for layer in cache.layers]

    def to_peft(self, prompts, task):
        if self.inserted:
            return super().to_peft(prompts, task)
        fields = {"token_dim": self.fp["hidden_size"], "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
                  "tokenizer_name_or_path": None, "tokenizer_kwargs": None, "num_attention_heads": self.fp["heads"]}
        return prompts.embedding[task].detach(), fields

    def from_peft(self, prompts, embeddings):
        with torch.no_grad():
            prompts.embedding.copy_(embeddings[None])


class LatePromptMethod(Method):
    """Late Prompt Tuning: a generator per task makes each example's prompt at layer start_layer."""

    name, mode, reads_input = "lpt", "insert", True

    def check(self):
        if self.config.peft_positions:
            raise ValueError("peft_positions applies to ptv2, and to input prompts on decoders (PEFT inserts encoder prompts before the embeddings)")

    @classmethod
    def shapes(cls, config, stacks, fp):
        r, h, p = config.generator_hidden, fp["hidden_size"], config.num_tokens
        up = p * h if config.generator == "npg" else h
        one = {"down.weight": (r, h), "down.bias": (r,), "up.weight": (up, r), "up.bias": (up,)}
        return {f"generators.{i}.{k}": v for i in range(config.num_tasks) for k, v in one.items()}

    def build(self):
        c = self.config
        return modules.LatePromptBank(self.fp["hidden_size"], c.num_tokens, c.generator, c.generator_hidden, c.num_tasks)

    def install(self, runtime):
        first = self.stacks[0]

        def make_tokens(runtime, hs, real, source):
            ids = runtime.prompt_ids
            return runtime.prompts(hs, real, source, None if ids is None else ids.to(hs.device))

        install_insertion(runtime, first, self.config.start_layer, self.config.num_tokens, make_tokens, first.rotary, bind)

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


METHODS = {m.name: m for m in (DeepPrefixMethod, InputPromptMethod, LatePromptMethod)}


def method_class(config) -> type[Method]:
    return METHODS[config.method]
