"""Child process for test_planner: peak resident memory of real training steps, as JSON on stdout.

Run with MALLOC_MMAP_THRESHOLD_ fixed so freed activations go back to the system and the
high-water mark tracks what was live. Measured = VmHWM during two steps - RSS before the model.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys

import torch


def _status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main():
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(2)
    import transformers as tf

    import fastprompt

    rss0 = _status("VmRSS")
    torch.manual_seed(0)
    config = tf.AutoConfig.for_model(**spec["config"])
    cls = getattr(tf, spec["cls"])
    model = cls(config)
    fastprompt.patch(model, **spec["patch"])
    model.train()
    opt = torch.optim.AdamW(fastprompt.prompt_parameters(model), lr=1e-3)
    b, t = spec["batch"], spec["seq"]
    ids = torch.randint(1, config.vocab_size, (b, t))
    labels = ids if spec["cls"].endswith("CausalLM") else torch.zeros(b, dtype=torch.long)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    for _ in range(2):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(json.dumps({"peak": _status("VmHWM") - rss0}))


if __name__ == "__main__":
    main()
