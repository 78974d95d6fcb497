"""Installing prompts into a transformers model and removing them again.

Everything enters through the registered attention function (never `past_key_values`):
- deep prefixes (ptv2): every self-attention layer >= start_layer gets a K/V prefix slot;
- input prompts on a causal stack: the P prompt tokens come before every real token and see
  none of them, so each layer's prompt K/V are a function of the prompt alone. They are
  computed once per forward by running the frozen stack on the P prompt embeddings (once in
  all at inference) and then used as that layer's prefix: identical to prepending the prompt
  at the input, the KV cache holds real tokens only and generate() needs nothing special;
- input prompts on a bidirectional stack (BERT, T5's encoder) and Late Prompt Tuning: tokens
  inserted into the hidden states ahead of a layer (see insertion.py).
Layers below the first prompted layer run without autograd; with checkpointing, the layers
that do build a graph are recomputed in backward (see truncation.py). Quantised (bitsandbytes)
backbones need fix-ups on CPU (see quantized.py).
"""

from __future__ import annotations

import inspect
import threading

import torch
import torch.nn as nn

from . import attention
from .architectures import Stack, UnsupportedModelError, fingerprint, spec_for
from .compat import find_cache, output_cache
from .insertion import install_insertion
from .prompts import DeepPrefix, FoldCache, LatePromptBank, SoftPrompt, TaskHeads
from .quantized import install_quantized_fixes, remove_quantized_fixes
from .truncation import install_truncation, remove_truncation

PROMPT_MODULE = "fastprompt"
HEAD_NAMES = ("classifier", "score", "qa_outputs")


class _ForwardState(threading.local):
    """Values that live for one forward pass, per thread: concurrent forwards of one patched
    model from several threads (different prompt_ids) do not see each other's."""

    computing = False  # the prompt's own pass (decoder input prompts) is running
    prompt_kv = None  # decoder input prompts: ([(K, V) per layer, each (n, Hkv, P, D)], ids into n)
    inserted_in_flight = 0
    mask2d = None  # the (B, T) padding mask the stack was called with
    prompt_ids = None  # (B,) task of each example, or None (task 0)
    example_ids = None  # (B,) dataset index of each example, for the lower-layer cache
    skip_lower = False  # every example of this forward is in the lower-layer cache
    source_len = None  # inside generate() on a decoder: the input's length (late prompts read only it)


def _state_property(name):
    return property(lambda self: getattr(self._state, name), lambda self, v: setattr(self._state, name, v))


class PromptRuntime:
    """Per-model state the attention function reads: the prompt module and per-forward values."""

    computing = _state_property("computing")
    prompt_kv = _state_property("prompt_kv")
    inserted_in_flight = _state_property("inserted_in_flight")
    mask2d = _state_property("mask2d")
    prompt_ids = _state_property("prompt_ids")
    example_ids = _state_property("example_ids")
    skip_lower = _state_property("skip_lower")
    source_len = _state_property("source_len")

    def __init__(self, model, config, stacks: list[Stack], prompts: nn.Module, mode: str):
        self.config = config
        self.stacks = stacks
        self.prompts = prompts
        self.mode = mode  # "prefix" | "prompt_kv" | "insert"
        self._state = _ForwardState()
        self.handles: list = []
        self.wrapped_forwards: list = []
        self.bnb_cpu_packing: list = []
        self.bnb_forwards: list = []
        self.bound: list[nn.Module] = []
        self.requires_grad: dict[str, bool] = {}
        self.attn_implementation = model.config._attn_implementation
        self.head_names: list[str] = []
        self.replaced_heads: list[tuple[str, nn.Module]] = []
        self.model_attrs: list[tuple[str, object]] = []
        self._kv_cache = FoldCache()
        self.lower_cache = None

    def snapshot(self):
        """What a checkpointed layer's recompute in backward must see again (maybe in another thread)."""
        return (self.prompt_ids, self.prompt_kv)

    def restore(self, snap):
        old = self.snapshot()
        self.prompt_ids, self.prompt_kv = snap
        return old

    def prefix(self, slot, dtype, device):
        """(K, V, ids) for a slot: K, V (Hkv, P, D) with ids None, or banks (T, Hkv, P, D) with
        ids (B,) choosing one per example; None when this call adds no prefix."""
        if slot is None or self.computing:
            return None
        if self.mode == "prefix":
            k, v = self.prompts.slot(slot, dtype, device)
            ids = self.prompt_ids
        elif self.mode == "prompt_kv" and self.prompt_kv is not None:
            kv, ids = self.prompt_kv
            k, v = kv[slot]
            k, v = k.to(dtype), v.to(dtype)
        else:
            return None
        if k.shape[0] == 1:
            return k[0], v[0], None
        if ids is None:
            raise ValueError(f"this model holds {self.config.num_tasks} prompts (num_tasks): pass prompt_ids=LongTensor[batch] to its forward")
        return k, v, ids.to(device)

    def check_example_ids(self, example_ids, batch: int | None):
        """example_ids: (B,) integer dataset indices, used by the lower-layer cache."""
        if self.lower_cache is None:
            raise ValueError("example_ids is for the lower-layer cache: call fastprompt.cache_lower_layers(model) first")
        if not isinstance(example_ids, torch.Tensor) or example_ids.dim() != 1 or example_ids.is_floating_point():
            raise ValueError(f"example_ids must be a 1-D integer tensor (one dataset index per example), got {example_ids!r}")
        if batch is not None and example_ids.shape[0] != batch:
            raise ValueError(f"example_ids has {example_ids.shape[0]} entries for a batch of {batch} examples")
        return example_ids.cpu()

    def check_prompt_ids(self, prompt_ids, batch: int | None):
        """Validates a forward's prompt_ids: (B,) integer tensor in [0, num_tasks)."""
        t = self.config.num_tasks
        if prompt_ids is None:
            if t > 1:
                raise ValueError(f"this model holds {t} prompts (num_tasks={t}): pass prompt_ids=LongTensor[batch] choosing one per example")
            return None
        if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 1 or prompt_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            got = f"{prompt_ids.dtype} tensor of shape {tuple(prompt_ids.shape)}" if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__
            raise ValueError(f"prompt_ids must be a 1-D integer tensor (one task index per example), got {got}")
        if batch is not None and prompt_ids.shape[0] != batch:
            raise ValueError(f"prompt_ids has {prompt_ids.shape[0]} entries for a batch of {batch} examples")
        if prompt_ids.device.type == "cpu" and prompt_ids.numel():  # a range check on GPU would sync
            lo, hi = int(prompt_ids.min()), int(prompt_ids.max())
            if lo < 0 or hi >= t:
                raise ValueError(f"prompt_ids must lie in [0, {t}) (num_tasks={t}), got values from {lo} to {hi}")
        return prompt_ids.long()


def _head_modules(model, config) -> list[tuple[str, nn.Module]]:
    names = [config.head] if config.head else list(HEAD_NAMES)
    found = [(n, getattr(model, n)) for n in names if isinstance(getattr(model, n, None), nn.Module)]
    if config.head and not found:
        raise ValueError(f"head={config.head!r}: the model has no submodule of that name")
    return found


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


def prompt_init(model, config, insert: bool) -> torch.Tensor:
    """(T, P, hidden): each task's prompt from init_token_ids or random vocabulary embeddings."""
    emb = model.get_input_embeddings()
    vocab = emb.weight.shape[0]
    p = config.num_tokens
    rows = []
    for _ in range(config.num_tasks):
        if config.init_token_ids is not None:
            ids = torch.as_tensor(list(config.init_token_ids), dtype=torch.long)
            if ids.numel() == 0 or ids.min() < 0 or ids.max() >= vocab:
                raise ValueError(f"init_token_ids must be non-empty token ids in [0, {vocab}), got {list(config.init_token_ids)}")
            ids = ids.repeat((p + ids.numel() - 1) // ids.numel())[:p]  # cycle, as PEFT does for short label words
        else:
            ids = torch.randint(0, vocab, (p,))
        ids = ids.to(emb.weight.device)
        with torch.no_grad():
            rows.append((_embed_for_insertion(model, ids) if insert else emb(ids)).float())
    return torch.stack(rows)


def _bind(runtime, module, slot, inserted=0, causal=False):
    # a plain attribute, not a submodule: the model's state_dict and module tree stay as they were
    module.__dict__["_fastprompt"] = attention.Binding(runtime, slot, inserted, causal)
    runtime.bound.append(module)


def _capture_mask(runtime, stack: Stack) -> None:
    """Keeps the (B, T) padding mask the stack's owner is called with (inserted tokens and the
    lower-layer cache place themselves by it)."""

    def prehook(module, args, kwargs):
        if runtime.computing:  # a decoder prompt's own pass, inside the real forward
            return None
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        runtime.mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        runtime.inserted_in_flight = 0  # a forward that raised midway leaves nothing behind
        return None

    runtime.handles.append(stack.owner.register_forward_pre_hook(prehook, with_kwargs=True))


def _install_prompt_kv(model, runtime, stack: Stack, absolute_positions: bool):
    base = stack.owner
    for i, attn in enumerate(stack.self_attention):
        _bind(runtime, attn, i)
    soft = runtime.prompts

    def compute(tasks):
        """Every layer's (K, V) of the prompts of `tasks` ((n,) ids, None = all), each (n, Hkv, P, D)."""
        emb_w = model.get_input_embeddings().weight
        embeds = soft.embedding if tasks is None else soft.embedding[tasks]
        embeds = embeds.to(device=emb_w.device, dtype=emb_w.dtype if emb_w.is_floating_point() else torch.float32)
        n, p = embeds.shape[:2]
        # rotary models: prompt at positions -P..-1 so real tokens keep 0..T-1
        start = 0 if absolute_positions else -p
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

    def prehook(module, args, kwargs):
        if runtime.computing:
            return None
        params = list(soft.parameters())
        ids = runtime.prompt_ids
        if torch.is_grad_enabled() and any(p.requires_grad for p in params) and ids is not None and soft.num_tasks > 1:
            # training: only the tasks present in the batch, ids re-indexed into them
            used, ids = torch.unique(ids, return_inverse=True)
            runtime.prompt_kv = (compute(used), ids)
        else:
            runtime.prompt_kv = (runtime._kv_cache.get(params, None, lambda: compute(None)), ids)
        return None

    # hooked on the stack's first layer (OPTForCausalLM calls model.decoder, never the base
    # model). Checkpointed layers get these K/V back for their recompute from a snapshot
    runtime.handles.append(stack.layers[0].register_forward_pre_hook(prehook, with_kwargs=True))


def _inputs(args, kwargs) -> torch.Tensor | None:
    """The (B, T) input_ids or (B, T, H) inputs_embeds a forward or generate() was called with."""
    for x in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(x, torch.Tensor):
            return x
    return None


def _batch_size(args, kwargs) -> int | None:
    x = _inputs(args, kwargs)
    return None if x is None else x.shape[0]


def _input_length(args, kwargs) -> int | None:
    x = _inputs(args, kwargs)
    return x.shape[1] if x is not None and x.dim() >= 2 else None


def _check_labels(runtime, labels, ids) -> None:
    """With per-task heads, every label must be one of its example's task's labels."""
    if not isinstance(labels, torch.Tensor) or labels.device.type != "cpu" or labels.is_floating_point():
        return
    counts = torch.tensor([c for _, c in runtime.config.heads])
    tasks = torch.zeros(labels.shape[0], dtype=torch.long) if ids is None else ids.cpu()
    limit = counts[tasks].view(-1, *([1] * (labels.dim() - 1)))
    bad = ((labels >= limit) | ((labels < 0) & (labels != -100))).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        name, count = runtime.config.heads[int(tasks[i])]
        raise ValueError(f"labels: example {i} has label {int(labels[tuple(bad[0])])} but its task {name!r} has {count} labels")


def _positions_from_mask(runtime, kwargs) -> None:
    """Rotary decoders called without position_ids on a left-padded batch: positions from the mask.

    transformers then numbers every row 0..T-1, pads included. Unpatched, that is harmless
    (rotary scores depend on distances only), but prefix keys carry no rotation and prompt tokens
    sit at -P..-1, so an example's output would depend on how much padding its batch has.
    Counting positions from each row's first real token (as generate() does) keeps a padded
    example equal to the same example alone; on unpadded and right-padded rows it gives the real
    tokens the same 0..n-1 (no check for left padding: that would sync a GPU every forward).
    Calls with a KV cache continue its positions and are left as they are."""
    stack = runtime.stacks[0]
    mask = kwargs.get("attention_mask")
    if stack.rotary is None or not stack.causal or kwargs.get("position_ids") is not None:
        return
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and find_cache((), kwargs) is None:
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)


def _wrap_entry_points(model, runtime) -> None:
    """model.forward and model.generate take `prompt_ids` (instance attributes; unpatch removes them)."""
    def with_prompt_ids(original, is_forward):
        sig = inspect.signature(original)
        params = [p for p in sig.parameters.values() if p.name not in ("prompt_ids", "example_ids")]
        at = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
        for name in ("example_ids", "prompt_ids"):
            params.insert(at, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None))

        def wrapper(*args, prompt_ids=None, example_ids=None, **kwargs):
            if prompt_ids is None and runtime.prompt_ids is not None:
                ids = runtime.prompt_ids  # called inside generate(): the ids it was given
            else:
                ids = runtime.check_prompt_ids(prompt_ids, _batch_size(args, kwargs))
            if runtime.config.heads and is_forward:
                _check_labels(runtime, kwargs.get("labels"), ids)
            if is_forward:
                _positions_from_mask(runtime, kwargs)
            if not is_forward and ids is not None:
                kwargs["prompt_ids"] = ids  # generate() expands it with the batch (beams, samples)
            if example_ids is not None:
                example_ids = runtime.check_example_ids(example_ids, _batch_size(args, kwargs))
            previous = runtime.prompt_ids, runtime.example_ids, runtime.source_len
            runtime.prompt_ids, runtime.example_ids = ids, example_ids
            if not is_forward and runtime.source_len is None:
                # a late prompt is generated from the input given to generate(), so every new token sees
                # the same prompt whether generate() runs with a KV cache or recomputes the whole sequence
                runtime.source_len = _input_length(args, kwargs)
            try:
                return original(*args, **kwargs)
            finally:
                runtime.prompt_ids, runtime.example_ids, runtime.source_len = previous
                runtime.skip_lower = False

        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__doc__ = original.__doc__
        wrapper.__name__ = getattr(original, "__name__", "forward")
        return wrapper

    for name in ("forward", "generate"):
        if not hasattr(model, name):
            continue
        runtime.model_attrs.append((name, model.__dict__.get(name, _MISSING)))
        model.__dict__[name] = with_prompt_ids(getattr(model, name), name == "forward")


_MISSING = object()


def _install_task_heads(model, runtime, heads) -> None:
    """Replaces the model's linear head by a TaskHeads bank (config.heads)."""
    counts = [c for _, c in runtime.config.heads]
    if len(heads) != 1 or not isinstance(heads[0][1], nn.Linear):
        found = ", ".join(f"{n} ({type(m).__name__})" for n, m in heads) or "none"
        raise ValueError(f"heads= needs a model with one nn.Linear task head (classifier/score, or head=NAME); found: {found}")
    name, linear = heads[0]
    if linear.out_features != max(counts):
        raise ValueError(
            f"heads={dict(runtime.config.heads)} needs the model built with num_labels={max(counts)} (the largest "
            f"task), but its {name} has {linear.out_features} outputs"
        )
    if not linear.weight.is_floating_point():
        raise ValueError(f"the task head {name} is quantised ({linear.weight.dtype}); keep heads out of quantisation")
    bank = TaskHeads(linear, counts, runtime)
    runtime.replaced_heads.append((name, linear))
    model._modules[name] = bank


def position_shift_hooks(model, stacks: list[Stack], shift: int) -> list:
    """Forward pre-hooks adding `shift` to every position id (PEFT numerics: its prefix occupies
    positions 0..P-1 of the KV cache). Rotary stacks: on the rotary module; learned absolute
    positions: on the position embedding table."""
    def rotary_hook(module, args, kwargs):
        if "position_ids" in kwargs:
            return args, {**kwargs, "position_ids": kwargs["position_ids"] + shift}
        return (args[0], args[1] + shift, *args[2:]), kwargs

    def table_hook(module, args):
        return (args[0] + shift, *args[1:])

    base = model.base_model
    table = getattr(getattr(base, "embeddings", None), "position_embeddings", None)
    if table is None and model.config.model_type == "gpt2":
        table = base.wpe
    handles = []
    if stacks[0].rotary is not None:
        handles.append(stacks[0].rotary.register_forward_pre_hook(rotary_hook, with_kwargs=True))
    elif isinstance(table, nn.Embedding):
        handles.append(table.register_forward_pre_hook(table_hook))
    else:
        raise ValueError(f"peft_positions is not available for model_type={model.config.model_type!r} (rotary or learned absolute positions only)")
    return handles


def _probe(model, runtime) -> None:
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


def prompt_shapes(model: nn.Module, config) -> dict[str, tuple[int, ...]]:
    """The state_dict shapes of the prompt module `install` would build, without building it."""
    stacks = spec_for(model).stacks(model)
    fp = fingerprint(model)
    p, h, t = config.num_tokens, fp["hidden_size"], config.num_tasks
    if config.method == "prompt":
        return {"embedding": (t, p, h)}
    if config.method == "lpt":
        r = config.generator_hidden
        up = p * h if config.generator == "npg" else h
        one = {"down.weight": (r, h), "down.bias": (r,), "up.weight": (up, r), "up.bias": (up,)}
        return {f"generators.{i}.{k}": v for i in range(t) for k, v in one.items()}
    n_slots = sum(max(len(s.layers) - config.start_layer, 0) for s in stacks)
    if not config.reparam:
        return {"prefix": (t, n_slots, 2, fp["kv_heads"], p, fp["head_dim"])}
    r = config.reparam_hidden
    out = n_slots * 2 * fp["kv_heads"] * fp["head_dim"]
    return {"embedding": (t, p, h), "mlp.0.weight": (r, h), "mlp.0.bias": (r,), "mlp.2.weight": (out, r), "mlp.2.bias": (out,)}


def head_shapes(model: nn.Module, config) -> dict[str, tuple[int, ...]]:
    """name -> shape of the head parameters `install` would make trainable, keyed '<head>.<param>'."""
    if not config.train_head:
        return {}
    shapes = {}
    for n, m in _head_modules(model, config):
        for k, v in m.state_dict().items():
            # per-task heads: a bank (T, L, H) / (T, L) in place of the linear head's (L, H) / (L,)
            bank = config.heads and not isinstance(m, TaskHeads)
            shapes[f"{n}.{k}"] = (config.num_tasks, *v.shape) if bank else tuple(v.shape)
    return shapes


def install(model: nn.Module, config) -> PromptRuntime:
    """Adds prompts to `model` in place per `config` (a PromptConfig); returns the runtime."""
    spec = spec_for(model)
    stacks = spec.stacks(model)
    fp = fingerprint(model)
    n_layers = min(len(s.layers) for s in stacks)
    if not 0 <= config.start_layer < n_layers:
        raise ValueError(f"start_layer must be in [0, {n_layers}) for this model, got {config.start_layer}")

    if config.method == "ptv2":
        n_slots = sum(len(s.layers) - config.start_layer for s in stacks)
        prompts = DeepPrefix(
            n_slots, fp["kv_heads"], config.num_tokens, fp["head_dim"], fp["hidden_size"],
            reparam=config.reparam, reparam_hidden=config.reparam_hidden, dropout=config.prefix_dropout,
            num_tasks=config.num_tasks,
        )
        mode = "prefix"
    elif config.method == "prompt":
        if config.start_layer != 0:
            raise ValueError(f"start_layer must be 0 for method='prompt' (the prompt is at the input), got {config.start_layer}")
        insert = not stacks[0].causal
        prompts = SoftPrompt(prompt_init(model, config, insert))
        mode = "insert" if insert else "prompt_kv"
    else:  # "lpt"
        prompts = LatePromptBank(fp["hidden_size"], config.num_tokens, config.generator, config.generator_hidden, config.num_tasks)
        mode = "insert"
    if config.peft_positions and mode == "insert":
        raise ValueError("peft_positions applies to ptv2, and to input prompts on decoders (PEFT inserts encoder prompts before the embeddings)")
    if config.peft_positions and config.start_layer != 0:
        raise ValueError(f"peft_positions reproduces PEFT, whose prefixes start at layer 0; got start_layer={config.start_layer}")

    device = next(model.parameters()).device
    prompts.to(device)
    runtime = PromptRuntime(model, config, stacks, prompts, mode)
    runtime.fingerprint = fp
    heads = _head_modules(model, config) if config.train_head else []
    runtime.head_names = [n for n, _ in heads]
    first = stacks[0]
    try:
        if mode == "prefix":
            slot = 0
            for s in stacks:
                for i, attn in enumerate(s.self_attention):
                    if i >= config.start_layer:
                        _bind(runtime, attn, slot)
                        slot += 1
        elif mode == "prompt_kv":
            _install_prompt_kv(model, runtime, first, spec.absolute_positions)
        _capture_mask(runtime, first)
        if mode == "insert":
            if config.method == "prompt":
                soft = prompts

                def make_tokens(hs, real, source):
                    ids = runtime.prompt_ids
                    if soft.num_tasks == 1 or ids is None:
                        return soft.embedding[0][None].expand(hs.shape[0], -1, -1)
                    return soft.embedding[ids.to(soft.embedding.device)]
            else:
                def make_tokens(hs, real, source):
                    ids = runtime.prompt_ids
                    return prompts(hs, real, source, None if ids is None else ids.to(hs.device))
            install_insertion(runtime, first, config.start_layer, config.num_tokens, make_tokens, first.rotary, _bind)

        # layers below the first prompt of the first stack have frozen inputs only: no graph there.
        # Later stacks (T5's decoder) read the first stack's output, so all their layers keep theirs.
        L = config.start_layer
        with_grad = first.layers[L:] + [l for s in stacks[1:] for l in s.layers]
        install_truncation(
            first.layers[:L], with_grad, runtime.wrapped_forwards, config.checkpointing,
            bypass=lambda: runtime.computing, snapshot=runtime.snapshot, restore=runtime.restore,
            skip=lambda: runtime.skip_lower,
        )
        if config.peft_positions:
            runtime.handles += position_shift_hooks(model, stacks, config.num_tokens)
        install_quantized_fixes(model, runtime)

        runtime.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        model.add_module(PROMPT_MODULE, prompts)
        for p in prompts.parameters():
            p.requires_grad_(True)
        for _, head in heads:
            for p in head.parameters():
                if not p.is_floating_point():
                    raise ValueError(
                        f"the task head has non-float parameters ({p.dtype}): keep heads out of quantisation, e.g. "
                        "BitsAndBytesConfig(..., llm_int8_skip_modules=[\"classifier\", \"pooler\", \"score\"]), or pass train_head=False"
                    )
                p.requires_grad_(True)
        if config.heads:
            _install_task_heads(model, runtime, heads)
        _wrap_entry_points(model, runtime)
        model.__dict__["_fastprompt_runtime"] = runtime
        attention.register()
        model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)
        _probe(model, runtime)
    except Exception:
        uninstall(model, runtime)
        raise
    return runtime


def uninstall(model: nn.Module, runtime: PromptRuntime) -> None:
    """Removes everything `install` added and restores attention and requires_grad flags."""
    if runtime.lower_cache is not None:
        runtime.lower_cache.close()
    for name, previous in reversed(runtime.model_attrs):
        if previous is _MISSING:
            model.__dict__.pop(name, None)
        else:
            model.__dict__[name] = previous
    runtime.model_attrs.clear()
    for name, original in reversed(runtime.replaced_heads):
        model._modules[name] = original
    runtime.replaced_heads.clear()
    for h in runtime.handles:
        h.remove()
    runtime.handles.clear()
    remove_truncation(runtime.wrapped_forwards)
    remove_quantized_fixes(runtime)
    for m in runtime.bound:
        m.__dict__.pop("_fastprompt", None)
    runtime.bound.clear()
    if PROMPT_MODULE in model._modules:
        del model._modules[PROMPT_MODULE]
    for n, p in model.named_parameters():
        if n in runtime.requires_grad:
            p.requires_grad_(runtime.requires_grad[n])
    if model.config._attn_implementation != runtime.attn_implementation:
        model.set_attn_implementation(runtime.attn_implementation)
    model.__dict__.pop("_fastprompt_runtime", None)


def runtime_of(model: nn.Module) -> PromptRuntime | None:
    return model.__dict__.get("_fastprompt_runtime")
