"""PromptConfig: everything that defines a prompt, validated when it is built (the fields' own
types and ranges here; what concerns one method by its class, integration/methods/)."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields, replace

from .integration.facade import method_class, method_names

GENERATORS = ("npg", "avgpool", "maxpool")
PREFIX_INITS = ("random", "zero")
DEFAULT_NUM_TOKENS = 16
# fields that say how to train, not what the prompt is: a saved prompt loads whatever they are
RUNTIME_FIELDS = ("checkpointing",)
# how a prompt starts; once trained (or saved) the tensors say it all, so saves drop these
INIT_FIELDS = ("init_text", "prefix_init")


@dataclass(frozen=True)
class PromptConfig:
    """One prompt's definition; `fastprompt.patch(model, **fields)` builds one of these.

    method: "ptv2" (a trainable key/value prefix in every self-attention layer >= start_layer,
        P-Tuning v2), "prompt" (a soft prompt of num_tokens embeddings at the input, Lester et al.)
        or "lpt" (Late Prompt Tuning: num_tokens tokens generated per example from the hidden
        states entering layer start_layer and inserted there).
    num_tokens: prefix / prompt length P (> 0); default 16, or with init_text the text's token count.
    start_layer: first layer with a prompt; must be 0 for "prompt". Layers below it run without
        autograd, so the backward pass stops there.
    reparam: ptv2 only; P-Tuning v2's MLP reparameterisation Embedding(P, H) -> Linear(H, r) ->
        Tanh -> Linear(r, layers * 2 * Hkv * D); reparam_hidden is r.
    prefix_dropout: dropout on the prefix keys/values in training (P-Tuning v2 uses the hidden dropout).
    init_token_ids: "prompt" only; token ids whose embeddings initialise the prompt (cycled to
        num_tokens), e.g. class-label words; None = random vocabulary embeddings.
    init_text: start from a text (patch(..., tokenizer=tok) tokenizes it). "ptv2": every prefix layer
        starts from the frozen model's own keys and values of the text (a real prefill; on a decoder
        with peft_positions=True the untrained model then equals the unpatched model with the text
        prepended); "prompt": from the text's token embeddings. The text is cut or repeated to
        num_tokens when that is given. Not for "lpt" (its prompt is generated per input).
    prefix_init: "ptv2" without init_text: "random" (N(0, 1), as P-Tuning v2 and PEFT start; the
        default) or "zero" (a zero prefix; with reparam the MLP's last layer starts at zero).
    generator, generator_hidden: "lpt" only; the prompt generator ("npg": [CLS] or last real token
        -> Linear(H, r) -> ReLU -> Linear(r, n*H); "avgpool"/"maxpool": Linear(H, r) on every token,
        pooled to n, ReLU, Linear(r, H)) and its width r.
    checkpointing: recompute the layers that build a graph (those >= start_layer) in backward.
    train_head: also train the task head (`classifier`, `score`, `qa_outputs`, or `head`).
    head: name of the head submodule when it is not one of those.
    num_tasks: T prompts in one bank (one per task); `model(..., prompt_ids=LongTensor[B])` picks
        each example's prompt, so one batch may mix tasks. Every prompt tensor has a leading
        task dimension (T, ...); an lpt bank holds one generator per task.
    heads: per-task classification heads, {task name: number of labels} (tasks in that order;
        num_tasks defaults to its length). The model's linear head becomes a bank (T, L, H) with
        L = model.config.num_labels = the largest count; each example's logits beyond its task's
        label count are the dtype's minimum, so the model's own loss and argmax stay per task.
    peft_positions: shift the real tokens' positions by num_tokens as PEFT does (its prefix sits in
        the KV cache), reproducing a PEFT adapter's numerics exactly; the default keeps 0..T-1.
    """

    method: str = "ptv2"
    num_tokens: int | None = None
    start_layer: int = 0
    reparam: bool = False
    reparam_hidden: int = 512
    prefix_dropout: float = 0.0
    init_token_ids: tuple[int, ...] | None = None
    generator: str = "npg"
    generator_hidden: int = 128
    checkpointing: bool = False
    train_head: bool = True
    head: str | None = None
    num_tasks: int = 1
    heads: tuple[tuple[str, int], ...] | None = None
    peft_positions: bool = False
    init_text: str | None = None
    prefix_init: str = "random"

    def __post_init__(self):
        method = method_class(self.method) if isinstance(self.method, str) and self.method in method_names() else None
        if method is None:
            raise ValueError(f"method must be one of {method_names()}, got {self.method!r}")
        if self.init_text is not None:
            if not isinstance(self.init_text, str) or not self.init_text.strip():
                raise ValueError(f"init_text must be a non-empty string, got {self.init_text!r}")
            if self.init_token_ids is not None:
                raise ValueError("pass init_text or init_token_ids, not both")
        elif self.num_tokens is None:
            object.__setattr__(self, "num_tokens", DEFAULT_NUM_TOKENS)
        # None only while init_text waits for its tokenizer (patch resolves it to the text's length)
        if self.num_tokens is not None and (isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) or self.num_tokens <= 0):
            raise ValueError(f"num_tokens must be a positive int, got {self.num_tokens!r}")
        if self.prefix_init not in PREFIX_INITS:
            raise ValueError(f"prefix_init must be one of {PREFIX_INITS}, got {self.prefix_init!r}")
        if isinstance(self.start_layer, bool) or not isinstance(self.start_layer, int) or self.start_layer < 0:
            raise ValueError(f"start_layer must be a non-negative int, got {self.start_layer!r}")
        if not isinstance(self.reparam_hidden, int) or self.reparam_hidden <= 0:
            raise ValueError(f"reparam_hidden must be a positive int, got {self.reparam_hidden!r}")
        if not 0.0 <= float(self.prefix_dropout) < 1.0:
            raise ValueError(f"prefix_dropout must be in [0, 1), got {self.prefix_dropout!r}")
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {self.generator!r}")
        if isinstance(self.generator_hidden, bool) or not isinstance(self.generator_hidden, int) or self.generator_hidden <= 0:
            raise ValueError(f"generator_hidden must be a positive int, got {self.generator_hidden!r}")
        if not isinstance(self.checkpointing, bool):
            raise ValueError(f"checkpointing must be True or False, got {self.checkpointing!r}")
        if self.init_token_ids is not None:
            ids = tuple(self.init_token_ids)
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError(f"init_token_ids must be a non-empty sequence of ints, got {self.init_token_ids!r}")
            object.__setattr__(self, "init_token_ids", ids)

        if self.heads is not None:
            items = list(self.heads.items()) if isinstance(self.heads, dict) else [tuple(x) for x in self.heads]
            if not items or not all(
                len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], int) and not isinstance(x[1], bool) and x[1] >= 2 for x in items
            ):
                raise ValueError(f"heads must map task names to label counts >= 2, e.g. {{'sst2': 2, 'ner': 9}}, got {self.heads!r}")
            if len({n for n, _ in items}) != len(items):
                raise ValueError(f"heads has repeated task names: {[n for n, _ in items]}")
            object.__setattr__(self, "heads", tuple((n, c) for n, c in items))
            if self.num_tasks == 1 and len(items) > 1:
                object.__setattr__(self, "num_tasks", len(items))
            if not self.train_head:
                raise ValueError("heads needs train_head=True (the per-task heads are trained)")
        if isinstance(self.num_tasks, bool) or not isinstance(self.num_tasks, int) or self.num_tasks <= 0:
            raise ValueError(f"num_tasks must be a positive int, got {self.num_tasks!r}")
        if self.heads is not None and len(self.heads) != self.num_tasks:
            raise ValueError(f"num_tasks={self.num_tasks} but heads names {len(self.heads)} tasks; give one head per task")
        if not isinstance(self.peft_positions, bool):
            raise ValueError(f"peft_positions must be True or False, got {self.peft_positions!r}")
        method.validate(self)

    @classmethod
    def default(cls, name: str):
        """A field's default value."""
        f = next(f for f in fields(cls) if f.name == name)
        return f.default if f.default is not MISSING else f.default_factory()

    @property
    def task_names(self) -> list[str]:
        """Task names: the heads' keys, or '0'..'T-1'."""
        return [n for n, _ in self.heads] if self.heads else [str(i) for i in range(self.num_tasks)]

    def prompt_fields(self) -> dict:
        """to_dict() without the runtime-only and initialisation fields: what must match for a saved prompt to load."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS + INIT_FIELDS}

    def without_init(self) -> "PromptConfig":
        """The same prompt with the initialisation fields at their defaults (what a save records)."""
        return replace(self, init_text=None, prefix_init="random")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["init_token_ids"] is not None:
            d["init_token_ids"] = list(d["init_token_ids"])
        if d["heads"] is not None:
            d["heads"] = [list(x) for x in d["heads"]]  # JSON keeps the order of a list of pairs
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PromptConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown prompt config fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)
