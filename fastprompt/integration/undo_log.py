"""UndoLog: what every installer did to a model, as steps `unpatch` replays in reverse.

Each installer (hooks, bound attention modules, wrapped forwards, bitsandbytes fix-ups, trained
heads, entry points, the prompt module, requires_grad flags, the attention implementation) pushes
the step that undoes its change as it makes it, so a patch that fails midway undoes exactly what
it had done, and `unpatch` restores the model by replaying the log. A step is called with the model
(`step(model)`): steps never hold the model or its runtime themselves, so the log adds no reference
cycle (back_references.py)."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

MISSING = object()  # an instance attribute that did not exist before: undoing removes it


def _put(obj, name: str, value) -> None:
    if value is MISSING:
        obj.__dict__.pop(name, None)
    else:
        obj.__dict__[name] = value


class UndoLog:
    """Undo steps in the order their changes were made; `replay` runs them last first."""

    def __init__(self):
        self._steps: list[Callable[[nn.Module], None]] = []

    def push(self, step: Callable[[nn.Module], None]) -> None:
        """step(model) undoes one change; it must capture neither the model nor the runtime."""
        self._steps.append(step)

    def set_attribute(self, obj, name: str, value) -> None:
        """obj.__dict__[name] = value (a plain instance attribute: no submodule, no class change),
        undone by putting back what was there, or removing it. obj: a submodule, never the model."""
        previous = obj.__dict__.get(name, MISSING)
        obj.__dict__[name] = value
        self.push(lambda model: _put(obj, name, previous))

    def set_model_attribute(self, model: nn.Module, name: str, value) -> None:
        """set_attribute on the model itself, which the step then gets as its argument."""
        previous = model.__dict__.get(name, MISSING)
        model.__dict__[name] = value
        self.push(lambda model: _put(model, name, previous))

    def hook(self, handle) -> None:
        """A registered hook's RemovableHandle (it reaches its module weakly)."""
        self.push(lambda model: handle.remove())

    def replay(self, model: nn.Module) -> None:
        """Runs every step, last first, and empties the log; the first error is raised after all ran."""
        error = None
        while self._steps:
            step = self._steps.pop()
            try:
                step(model)
            except Exception as e:  # undo the rest regardless: a half-restored model is worse
                error = error or e
        if error is not None:
            raise error
