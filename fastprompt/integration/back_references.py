"""What fastprompt installs into a patched model (hooks, forward wrappers, attention bindings) reaches
the model, its modules and its PromptRuntime weakly.

The model owns those callables and owns its runtime, which holds the model's layer stacks: a strong
reference back from any of them would close a reference cycle, and a dropped model would then stay
alive, weights and all, until the cyclic garbage collector runs (never, with gc disabled). The one
strong edge is model -> runtime; the runtime reaches the model itself weakly too (Method.model,
Stack.owner).
"""

from __future__ import annotations

import weakref
from typing import Callable


def weak_method(owner, method: Callable) -> Callable:
    """`method`, a bound method of `owner` (its forward, say), as a function that holds `owner`
    weakly; any other callable (a wrapper installed by someone else) is returned as it is."""
    if getattr(method, "__self__", None) is not owner:
        return method
    func, ref = method.__func__, weakref.ref(owner)

    def call(*args, **kwargs):
        obj = ref()
        if obj is None:
            raise ReferenceError(f"{func.__qualname__}: the object it belongs to has been deleted")
        return func(obj, *args, **kwargs)

    return call


def weak_hook(runtime, hook: Callable) -> Callable:
    """hook(runtime, module, ...) as a module hook holding the runtime weakly. Once the runtime is gone
    (unpatched, or the model dropped while someone kept one of its modules) the hook does nothing.
    `hook` must capture no strong reference to the runtime, the model or its modules itself."""
    ref = weakref.ref(runtime)

    def call(*args, **kwargs):
        rt = ref()
        return None if rt is None else hook(rt, *args, **kwargs)

    return call
