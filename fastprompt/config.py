"""PromptConfig: everything that defines a prompt, validated when it is built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

METHODS = ("ptv2", "prompt", "lpt")
GENERATORS = ("npg", "avgpool", "maxpool")
# fields that say how to train, not what the prompt is: a saved prompt loads whatever they are
RUNTIME_FIELDS = ("checkpointing",)


@dataclass(frozen=True)
class PromptConfig:
    """One prompt's definition; `fastprompt.patch(model, **fields)` builds one of these.

    method: "ptv2" (a trainable key/value prefix in every self-attention layer >= start_layer,
        P-Tuning v2), "prompt" (a soft prompt of num_tokens embeddings at the input, Lester et al.)
        or "lpt" (Late Prompt Tuning: num_tokens tokens generated per example from the hidden
        states entering layer start_layer and inserted there).
    num_tokens: prefix / prompt length P (> 0).
    start_layer: first layer with a prompt; must be 0 for "prompt". Layers below it run without
        autograd, so the backward pass stops there.
    reparam: ptv2 only; P-Tuning v2's MLP reparameterisation Embedding(P, H) -> Linear(H, r) ->
        Tanh -> Linear(r, layers * 2 * Hkv * D); reparam_hidden is r.
    prefix_dropout: dropout on the prefix keys/values in training (P-Tuning v2 uses the hidden dropout).
    init_token_ids: "prompt" only; token ids whose embeddings initialise the prompt (cycled to
        num_tokens), e.g. class-label words; None = random vocabulary embeddings.
    generator, generator_hidden: "lpt" only; the prompt generator ("npg": [CLS] or last real token
        -> Linear(H, r) -> ReLU -> Linear(r, n*H); "avgpool"/"maxpool": Linear(H, r) on every token,
        pooled to n, ReLU, Linear(r, H)) and its width r.
    checkpointing: recompute the layers that build a graph (those >= start_layer) in backward.
    train_head: also train the task head (`classifier`, `score`, `qa_outputs`, or `head`).
    head: name of the head submodule when it is not one of those.
    """

    method: str = "ptv2"
    num_tokens: int = 16
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

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) or self.num_tokens <= 0:
            raise ValueError(f"num_tokens must be a positive int, got {self.num_tokens!r}")
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
        if self.reparam and self.method != "ptv2":
            raise ValueError(f"reparam=True is for method='ptv2' only, got method={self.method!r}")
        if self.init_token_ids is not None:
            if self.method != "prompt":
                raise ValueError(f"init_token_ids is for method='prompt' only, got method={self.method!r}")
            ids = tuple(self.init_token_ids)
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError(f"init_token_ids must be a non-empty sequence of ints, got {self.init_token_ids!r}")
            object.__setattr__(self, "init_token_ids", ids)

    def prompt_fields(self) -> dict:
        """to_dict() without the runtime-only fields: what must match for a saved prompt to load."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["init_token_ids"] is not None:
            d["init_token_ids"] = list(d["init_token_ids"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PromptConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown prompt config fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)
