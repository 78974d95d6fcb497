"""Method, the abstract prompt method, and the registry every list of method names derives from.

A method class owns everything that differs between methods: the config rules that concern it
(`validate`, model-free, run when a PromptConfig is built; `check`, on the model, at patch time),
its prompt module's state_dict shapes (so loads validate before building anything), building and
initialising that module, installing itself into the model, the prefix it contributes to each
bound attention call, moving one task of a bank in and out, growing a bank, and converting to and
from PEFT where PEFT has an equivalent. Subclasses register themselves by `name`; adding a method
is one new module in this package and its import in `__init__.py`.
"""

from __future__ import annotations

import weakref
from typing import ClassVar

import torch
import torch.nn as nn

from ..architectures import Stack
from ..model_shape import ModelShape

REGISTRY: dict[str, type[Method]] = {}  # name -> class, in registration order


class Method:
    """One prompt method. Class attributes say what the rest of the library may rely on:

    name: the PromptConfig.method value; peft_type: the PEFT adapter type with the same numerics,
    or None; reads_input: the prompt is made from each input's hidden states (late prompts);
    input_layer_only: the prompt enters at the input (start_layer must be 0); grows_sequence:
    layers >= start_layer see S + P tokens (tokens inserted into the hidden states; else P prefix
    keys); decoder_prompt_pass: on a causal stack the prompt runs a P-token pass of its own;
    accepts_init_text / accepts_peft_positions: whether init_text / peft_positions apply;
    exclusive_fields: PromptConfig fields only this method reads (elsewhere they must keep their
    defaults).
    """

    name: ClassVar[str] = ""
    peft_type: ClassVar[str | None] = None
    reads_input: ClassVar[bool] = False
    input_layer_only: ClassVar[bool] = False
    grows_sequence: ClassVar[bool] = False
    decoder_prompt_pass: ClassVar[bool] = False
    accepts_init_text: ClassVar[bool] = True
    accepts_peft_positions: ClassVar[bool] = True
    exclusive_fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    def __init__(self, model: nn.Module, config, stacks: list[Stack], shape: ModelShape, absolute_positions: bool = False,
                 init_ids: torch.Tensor | None = None):
        """init_ids: (P,) token ids of config.init_text (text_init.init_text_ids), or None."""
        self._model = weakref.ref(model)  # the model holds its runtime, which holds this method
        self.config, self.stacks, self.shape = config, stacks, shape
        self.absolute_positions = absolute_positions
        self.init_ids = init_ids
        self.check()

    @property
    def model(self) -> nn.Module:
        return self._model()

    # ---- configuration

    @classmethod
    def validate(cls, config) -> None:
        """Raises ValueError for a PromptConfig this method cannot mean (no model needed)."""
        for other in REGISTRY.values():
            if other is cls:
                continue
            for field in other.exclusive_fields:
                value = getattr(config, field)
                if value != config.default(field):
                    shown = f"{field}={value!r}" if isinstance(value, (bool, str)) else field
                    raise ValueError(f"{shown} is for method={other.name!r} only, got method={cls.name!r}")
        if config.init_text is not None and not cls.accepts_init_text:
            why = ": its prompt is generated from each input's hidden states" if cls.reads_input else ""
            raise ValueError(f"init_text does not apply to method={cls.name!r}{why}")
        if config.peft_positions and not cls.accepts_peft_positions:
            allowed = tuple(n for n, m in REGISTRY.items() if m.accepts_peft_positions)
            raise ValueError(f"peft_positions is for method in {allowed} (PEFT has no equivalent of {cls.name!r}), got method={cls.name!r}")

    def check(self) -> None:
        """Raises ValueError for a config this method cannot run on this model."""
        c = self.config
        if self.input_layer_only and c.start_layer != 0:
            raise ValueError(f"start_layer must be 0 for method={self.name!r} (the prompt is at the input), got {c.start_layer}")
        if c.peft_positions and c.start_layer != 0:
            raise ValueError(f"peft_positions reproduces PEFT, whose prefixes start at layer 0; got start_layer={c.start_layer}")

    # ---- the prompt module

    @classmethod
    def shapes(cls, config, shape: ModelShape) -> dict[str, tuple[int, ...]]:
        """The prompt module's state_dict shapes for `config` on a model of this shape, without building it."""
        raise NotImplementedError

    def build(self) -> nn.Module:
        """The prompt module, initialised (on the CPU; patch moves it to the model's device)."""
        raise NotImplementedError

    def install(self, runtime) -> None:
        """Binds the model's attention modules (runtime.bind) and adds the hooks this method needs
        (runtime.undo.hook), reaching the runtime weakly (back_references.py)."""
        raise NotImplementedError

    def prefix(self, runtime, slot: int, dtype: torch.dtype, device: torch.device):
        """(K, V, ids) this method adds to the bound attention call of `slot` (runtime.prefix's
        contract), or None."""
        return None

    @staticmethod
    def choose(runtime, k: torch.Tensor, v: torch.Tensor, ids, device):
        """K, V banks (T, Hkv, P, D) -> (K[0], V[0], None) for one task, or (K, V, ids) with ids (B,)."""
        if k.shape[0] == 1:
            return k[0], v[0], None
        if ids is None:
            raise ValueError(f"this model holds {runtime.config.num_tasks} prompts (num_tasks): pass prompt_ids=LongTensor[batch] to its forward")
        return k, v, ids.to(device)

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


def method_class(name: str) -> type[Method]:
    """The registered class of a method name, or ValueError naming the registered ones."""
    if name not in REGISTRY:
        raise ValueError(f"method must be one of {tuple(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def method_names() -> tuple[str, ...]:
    """Every registered method name, in registration order."""
    return tuple(REGISTRY)
