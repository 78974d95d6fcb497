"""Measurement helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time

import torch


def median_seconds(fn, repeats: int = 5) -> float:
    """Wall-clock median of `repeats` calls of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def saved_bytes(run, exclude) -> tuple[int, object]:
    """(bytes of the tensors autograd saves for backward while run() executes, deduplicated by
    storage, storages of the tensors in `exclude` (parameters, inputs) left out; run()'s result)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    return sum(seen.values()), result


def proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM", ...) in bytes; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeftRefused(RuntimeError):
    """PEFT itself cannot run this configuration with the installed transformers (the reason is the message)."""


def check_peft_runs(peft_model, inputs: dict) -> None:
    """One no-grad forward of a PEFT model; raises PeftRefused where PEFT refuses the installed
    transformers (peft 0.21.2's prefix tuning on 5.24 looks for a `past_key_values` argument that
    5.24 renamed: every SEQ_CLS and TOKEN_CLS model)."""
    import peft
    import transformers

    try:
        with torch.no_grad():
            peft_model(**inputs)
    except ValueError as e:
        if "does not support past key values" not in str(e):
            raise
        raise PeftRefused(f"peft {peft.__version__} cannot run {type(peft_model.get_base_model()).__name__} with "
                          f"transformers {transformers.__version__} ({e}); its rows run with transformers 5.23") from None
