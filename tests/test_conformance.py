"""The conformance matrix: every routed architecture with each head its family has, every method,
start layer 0 and N/2, checkpointing on and off, a bank with mixed prompt_ids, fp32 and bf16,
batches padded left, right or not at all, called the way users call (`model(**batch, labels=labels)`).

The full product is ~5,000 cells; the matrix covers every pair of option values at least once
(pairwise, greedy, deterministic) and every single option value on every architecture. Each cell
checks against independent references:
- checkpointing on: the same model without checkpointing (loss and every prompt/head gradient);
- a padded or mixed-task batch: each example run alone, unpadded, with its own task's prompt;
- ptv2 in fp32: the unpatched model with attention over an explicitly concatenated [prefix ; keys];
- bf16: the fp32 run of the same weights, within 2x (3x for gradients) the error of the unpatched
  model's own bf16 run against its fp32 run (the flash-attention rule), plus a floor.
Per architecture, outside the per-cell product: generate() greedy and beams cached == uncached,
save -> load into a fresh model -> equal outputs, transformers' own gradient checkpointing enabled
before or after patch (with a bank), and HF Trainer with and without gradient_checkpointing=True.

Non-default arguments here, and why: `num_tokens=3` / `num_tasks=2` / `start_layer` / `checkpointing`
are the options under test; prompts get a random offset so that they are not at their init.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import transformers as tf
from conftest import TINY, VOCAB
from reference import PREFIX, REF_IMPL, self_attention_modules

import fastprompt

P = 3
B, T, SHORT = 3, 7, 4  # batch, padded length, the short examples' real length

_CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert", "gpt2": "GPT2", "llama": "Llama",
                 "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma", "opt": "OPT", "t5": "T5"}
_HEAD_SUFFIX = {"lm": ("ForCausalLM", "LMHeadModel"), "seq2seq": ("ForConditionalGeneration",),
                "seqcls": ("ForSequenceClassification",), "tokcls": ("ForTokenClassification",), "qa": ("ForQuestionAnswering",)}
ENCODER_ARCHS = ("bert", "roberta", "distilbert")
# positions: rotary (relative), learned absolute from arange (a left-padded example sits at shifted
# positions in HF's own forward), or from the mask (roberta, opt)
ARANGE_ABSOLUTE = ("bert", "distilbert", "gpt2")
ROTARY = ("llama", "mistral", "qwen2", "qwen3", "gemma")


def _head_class(arch, head):
    for suffix in _HEAD_SUFFIX[head]:
        cls = getattr(tf, _CLASS_PREFIX[arch] + suffix, None)
        if cls is not None:
            return cls
    return None


def _heads(arch):
    if arch in ENCODER_ARCHS:
        wanted = ("seqcls", "tokcls", "qa")
    elif arch == "t5":
        wanted = ("seq2seq", "seqcls")
    else:
        wanted = ("lm", "seqcls", "tokcls", "qa")
    return [h for h in wanted if _head_class(arch, h) is not None]


ARCHS = tuple(TINY)
FACTORS = {
    "method": ("ptv2", "reparam", "prompt", "lpt"),
    "start": ("0", "half"),
    "ckpt": (False, True),
    "bank": (False, True),
    "dtype": ("fp32", "bf16"),
    "padding": ("none", "left", "right"),
}


def _valid(cell):
    return not (cell.get("method") == "prompt" and cell.get("start") == "half")  # input prompts live at layer 0


def _pairwise_cells():
    """Greedy all-pairs over (arch, head) and FACTORS, then every value of every factor on every arch."""
    names = ["target", *FACTORS]
    values = {"target": [(a, h) for a in ARCHS for h in _heads(a)], **{k: list(v) for k, v in FACTORS.items()}}
    uncovered = set()
    for x, y in itertools.combinations(names, 2):
        for vx in values[x]:
            for vy in values[y]:
                if _valid({x: vx, y: vy}):
                    uncovered.add(((x, vx), (y, vy)))
    rng = random.Random(0)
    cells = []
    while uncovered:
        (x, vx), (y, vy) = min(uncovered, key=repr)
        best, best_gain = None, -1
        for _ in range(40):
            cell = {n: rng.choice(values[n]) for n in names}
            cell[x], cell[y] = vx, vy
            if not _valid(cell):
                continue
            gain = sum(((a, cell[a]), (b, cell[b])) in uncovered for a, b in itertools.combinations(names, 2))
            if gain > best_gain:
                best, best_gain = cell, gain
        if best is None:  # the sampled fillers all hit the constraint: take the pair with start 0
            best = {n: values[n][0] for n in names}
            best[x], best[y] = vx, vy
        for a, b in itertools.combinations(names, 2):
            uncovered.discard(((a, best[a]), (b, best[b])))
        cells.append(best)
    for arch in ARCHS:
        mine = [c for c in cells if c["target"][0] == arch]
        for name in FACTORS:
            for v in FACTORS[name]:
                if not any(c[name] == v for c in mine):
                    cell = dict(rng.choice(mine))
                    cell[name] = v
                    if not _valid(cell):
                        cell["start"] = "0"
                    cells.append(cell)
                    mine.append(cell)
    return [{"arch": c["target"][0], "head": c["target"][1], **{k: c[k] for k in FACTORS}} for c in cells]


CELLS = _pairwise_cells()


def _cell_id(c):
    return "-".join([c["arch"], c["head"], c["method"], "L" + c["start"], "ckpt" if c["ckpt"] else "plain",
                     "bank" if c["bank"] else "one", c["dtype"], "pad" + c["padding"]])


def tiny(arch, head, seed=0):
    config = TINY[arch][0]()
    config.num_labels = 2 if head == "qa" else 3  # QA heads are (start, end)
    if config.pad_token_id is None:
        config.pad_token_id = 0
    torch.manual_seed(seed)
    return _head_class(arch, head)(config).eval()


def _pad_id(arch):
    pad = TINY[arch][0]().pad_token_id
    return 0 if pad is None else pad


def make_batch(arch, head, padding, seed=1):
    """A user's padded batch (B, T) and its labels; returns (batch, labels, lengths)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [T] * B if padding == "none" else [T, SHORT, SHORT + 1]
    ids = torch.full((B, T), _pad_id(arch), dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        row = torch.randint(3, VOCAB, (n,), generator=g)
        if arch == "t5":
            row[-1] = 1  # </s>, as T5's tokenizer ends every text (T5ForSequenceClassification pools there)
        sl = slice(T - n, T) if padding == "left" else slice(0, n)
        ids[i, sl], mask[i, sl] = row, 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if head == "seq2seq":
        batch["labels"] = torch.randint(3, VOCAB, (B, 4), generator=g)
    elif head == "lm":
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    elif head == "seqcls":
        batch["labels"] = torch.randint(0, 3, (B,), generator=g)
    elif head == "tokcls":
        batch["labels"] = torch.randint(0, 3, (B, T), generator=g).masked_fill(mask == 0, -100)
    elif head == "qa":
        batch["start_positions"] = torch.randint(0, SHORT, (B,), generator=g)
        batch["end_positions"] = torch.randint(0, SHORT, (B,), generator=g)
    return batch, lengths


def _patch_kwargs(c, n_layers):
    kw = dict(method="ptv2" if c["method"] == "reparam" else c["method"], num_tokens=P,
              start_layer=0 if c["start"] == "0" else n_layers // 2, checkpointing=c["ckpt"])
    if c["method"] == "reparam":
        kw.update(reparam=True, reparam_hidden=8)
    if c["bank"]:
        kw["num_tasks"] = 2
    return kw


def _n_layers(model):
    cfg = model.config
    return getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or getattr(cfg, "n_layers", None) or cfg.num_layers


def _perturb(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in fastprompt.prompt_parameters(model):
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.5)


def _outputs(out, head):
    """The tensors a user reads: logits, or (start, end) logits for QA."""
    if head == "qa":
        return [out.start_logits, out.end_logits]
    return [out.logits]


def _real_rows(x, head, i, lengths, padding):
    """Example i's real-token part of an output row (token-level heads), or the whole row."""
    row = x[i]
    if head in ("seqcls", "seq2seq") or lengths[i] == T:
        return row
    n = lengths[i]
    return row[T - n:] if padding == "left" else row[:n]


def build(c, dtype=torch.float32, **overrides):
    model = tiny(c["arch"], c["head"])
    kw = {**_patch_kwargs(c, _n_layers(model)), **overrides}
    fastprompt.patch(model, **kw)
    _perturb(model)
    return model.to(dtype)


def train_call(model, batch, prompt_ids):
    """The user's call: default forward with labels, loss.backward(); returns (outputs, loss, grads)."""
    model.train()
    model.zero_grad(set_to_none=True)
    kw = {} if prompt_ids is None else {"prompt_ids": prompt_ids}
    out = model(**batch, **kw)
    out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return [o.detach().float() for o in _outputs(out, model_head(model))], out.loss.detach().float(), grads


def model_head(model):
    name = type(model).__name__
    for head, suffixes in _HEAD_SUFFIX.items():
        if any(name.endswith(s) for s in suffixes):
            return head
    raise AssertionError(name)


def _alone(model, c, batch, lengths, i, prompt_ids):
    """Example i alone, unpadded, with its own task's prompt (no_grad, eval)."""
    arch, n = c["arch"], lengths[i]
    row = batch["input_ids"][i]
    real = batch["attention_mask"][i].bool()
    one = {"input_ids": row[real][None], "attention_mask": torch.ones(1, n, dtype=torch.long)}
    if arch in ARANGE_ABSOLUTE:
        # HF's own forward places a left-padded example at positions pad..T-1 (arange): so does the reference
        one["position_ids"] = torch.arange(T)[real][None]
    if c["head"] == "seq2seq":
        one["decoder_input_ids"] = batch["decoder_input_ids"][i:i + 1]
    if c["head"] == "lm":
        # the batch is called with its token labels, so is the example (a late prompt on a causal LM
        # reads only the tokens before the first target)
        one["labels"] = batch["labels"][i][real][None]
    kw = {} if prompt_ids is None else {"prompt_ids": prompt_ids[i:i + 1]}
    with torch.no_grad():
        return [o[0].float() for o in _outputs(model(**one, **kw), c["head"])]


def _hf_padding_invariant(c, batch, lengths):
    plain = tiny(c["arch"], c["head"])
    with torch.no_grad():
        got = [o.float() for o in _outputs(plain(**batch), c["head"])]
    for i in range(B):
        for g, w in zip(got, _alone(plain, c, batch, lengths, i, None)):
            if not torch.allclose(_real_rows(g, c["head"], i, lengths, c["padding"]), w, atol=3e-5, rtol=1e-4):
                return False
    return True


def _concat_reference(model, c, batch):
    """ptv2: the unpatched model, attention over explicitly concatenated prefix keys (float64)."""
    prefix = model.fastprompt.prefix.detach()[0]  # (slots, 2, Hkv, P, D), task 0
    start = fastprompt.prompt_config(model).start_layer
    fastprompt.unpatch(model)
    PREFIX.clear()
    slot = 0
    for stack in self_attention_modules(model, c["arch"]):
        for i, module in enumerate(stack):
            if i >= start:
                PREFIX[id(module)] = (prefix[slot, 0], prefix[slot, 1])
                slot += 1
    if c["arch"] in ROTARY and not bool(batch["attention_mask"][:, 0].all()):
        # patched rotary decoders count a left-padded row's positions from its first real token
        # (the test_cell "alone" check shows why): the reference gets the same positions
        batch = {**batch, "position_ids": (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)}
    model.set_attn_implementation(REF_IMPL)
    try:
        with torch.no_grad():
            model.eval()
            return [o.float() for o in _outputs(model(**batch), c["head"])]
    finally:
        model.set_attn_implementation("sdpa")
        PREFIX.clear()


def _inputs_for(c, batch):
    inputs = dict(batch)
    if c["head"] == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (B, 4), generator=torch.Generator().manual_seed(3))
    return inputs


def _close(got, want, atol=3e-5, rtol=1e-4, what=""):
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("c", CELLS, ids=[_cell_id(c) for c in CELLS])
def test_cell(c):
    batch, lengths = make_batch(c["arch"], c["head"], c["padding"])
    batch = _inputs_for(c, batch)
    ids = torch.tensor([1, 0, 1]) if c["bank"] else None
    model = build(c)
    outs, loss, grads = train_call(model, batch, ids)
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("fastprompt")), "no gradient reached the prompt"

    if c["ckpt"]:  # reference: the un-checkpointed run of the same model
        r_outs, r_loss, r_grads = train_call(build(c, checkpointing=False), batch, ids)
        _close(loss, r_loss, what="loss vs un-checkpointed")
        assert grads.keys() == r_grads.keys()
        for n in grads:
            _close(grads[n], r_grads[n], atol=1e-5, what=f"grad {n} vs un-checkpointed")

    if c["dtype"] == "bf16":
        _check_bf16(c, batch, ids, outs, loss, grads)
        return

    if (c["padding"] != "none" or c["bank"]) and _hf_padding_invariant(c, batch, lengths):
        # reference: each example alone, unpadded (where the unpatched model itself gives the same
        # outputs; BERT-style first-token pooling reads a pad token in a left-padded row)
        model.eval()
        with torch.no_grad():
            evald = [o.float() for o in _outputs(model(**batch, **({} if ids is None else {"prompt_ids": ids})), c["head"])]
        for i in range(B):
            for got, want in zip(evald, _alone(model, c, batch, lengths, i, ids)):
                _close(_real_rows(got, c["head"], i, lengths, c["padding"]), want, what=f"example {i} vs alone")

    if c["method"] == "ptv2" and not c["bank"]:  # reference: explicit concatenation
        model.eval()
        with torch.no_grad():
            evald = [o.float() for o in _outputs(model(**batch), c["head"])]
        for got, want in zip(evald, _concat_reference(model, c, batch)):
            if c["padding"] == "none" or c["head"] in ("seqcls", "seq2seq"):
                _close(got, want, what="vs concatenation")
            else:
                for i in range(B):
                    _close(_real_rows(got, c["head"], i, lengths, c["padding"]), _real_rows(want, c["head"], i, lengths, c["padding"]),
                           what=f"example {i} vs concatenation")


def _check_bf16(c, batch, ids, outs, loss, grads):
    """bf16 against the fp32 run of the same weights; scale: the unpatched model's own bf16 error."""
    ref_outs, ref_loss, ref_grads = train_call(build(c, dtype=torch.float32), batch, ids)
    plain32, plain16 = tiny(c["arch"], c["head"]), tiny(c["arch"], c["head"]).to(torch.bfloat16)
    with torch.no_grad():
        e32 = _outputs(plain32(**batch), c["head"])
        e16 = _outputs(plain16(**batch), c["head"])
    own = max(float((a.float() - b.float()).abs().max()) for a, b in zip(e16, e32))
    for got, want in zip(outs, ref_outs):
        err = float((got - want).abs().max())
        assert err <= 2 * own + 2e-2, f"bf16 output error {err:.4g} > 2 x the model's own bf16 error {own:.4g}"
    assert abs(float(loss - ref_loss)) <= 2 * own + 2e-2
    for n in ref_grads:
        g, r = grads[n], ref_grads[n]
        rel = float((g - r).norm() / r.norm().clamp_min(1e-12))
        assert rel <= 3 * max(own, 1e-2) + 5e-2, f"bf16 grad {n}: relative error {rel:.3g}"


# ---- per architecture: generate, save/load, transformers' checkpointing, Trainer ----------------

GEN_ARCHS = [a for a in ARCHS if a not in ENCODER_ARCHS]


@pytest.mark.parametrize("method", ["ptv2", "reparam", "prompt", "lpt"])
@pytest.mark.parametrize("arch", GEN_ARCHS)
def test_generate_cached_equals_uncached_greedy_and_beams(arch, method):
    head = "seq2seq" if arch == "t5" else "lm"
    c = {"arch": arch, "head": head, "method": method, "start": "0" if method == "prompt" else "half", "ckpt": False, "bank": True}
    model = build(c)
    model.eval()
    batch, _ = make_batch(arch, head, "none" if arch == "t5" else "left")
    kw = dict(attention_mask=batch["attention_mask"], max_new_tokens=5, do_sample=False, prompt_ids=torch.tensor([1, 0, 1]))
    for beams in (1, 2):
        cached = model.generate(batch["input_ids"], num_beams=beams, use_cache=True, **kw)
        uncached = model.generate(batch["input_ids"], num_beams=beams, use_cache=False, **kw)
        assert torch.equal(cached, uncached), f"beams={beams}: cached {cached.tolist()} != uncached {uncached.tolist()}"


@pytest.mark.parametrize("method", ["ptv2", "reparam", "prompt", "lpt"])
@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_load_into_a_fresh_model_gives_equal_outputs(tmp_path, arch, method):
    head = _heads(arch)[0]
    c = {"arch": arch, "head": head, "method": method, "start": "0" if method == "prompt" else "half", "ckpt": False, "bank": False}
    model = build(c)
    batch, _ = make_batch(arch, head, "right")
    batch = _inputs_for(c, batch)
    model.train()
    model(**batch).loss.backward()  # a trained-looking state: reparam folding happens at save
    model.eval()
    with torch.no_grad():
        want = _outputs(model(**batch), head)
    fastprompt.save_prompts(model, tmp_path / "p")
    fresh = fastprompt.load_prompts(tiny(arch, head), tmp_path / "p")
    with torch.no_grad():
        got = _outputs(fresh(**batch), head)
    for g, w in zip(got, want):
        _close(g, w, what="loaded vs saved")


HF_CKPT_ARCHS = ["llama", "bert", "gpt2", "t5", "opt", "qwen2"]


@pytest.mark.parametrize("when", ["before patch", "after patch", "with checkpointing=True"])
@pytest.mark.parametrize("method", ["ptv2", "prompt", "lpt"])
@pytest.mark.parametrize("arch", HF_CKPT_ARCHS)
def test_transformers_gradient_checkpointing_with_a_bank(arch, method, when):
    """gradient_checkpointing_enable() (what Trainer(gradient_checkpointing=True) calls): fastprompt's
    checkpointing takes over (its recompute restores the forward's prompt_ids); grads equal plain.
    With fastprompt's checkpointing=True as well, each layer is checkpointed once: the same grads, and
    every attention module runs as often as with checkpointing=True alone (forward and one recompute)."""
    head = _heads(arch)[0]
    c = {"arch": arch, "head": head, "method": method, "start": "0" if method == "prompt" else "half", "ckpt": False, "bank": True}
    batch, _ = make_batch(arch, head, "right")
    batch = _inputs_for(c, batch)
    ids = torch.tensor([1, 0, 1])
    r_saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: r_saved.append(t.numel()) or t, lambda t: t):
        _, r_loss, r_grads = train_call(build(c), batch, ids)

    model = tiny(arch, head)
    if when != "after patch":
        model.gradient_checkpointing_enable()
    fastprompt.patch(model, **_patch_kwargs({**c, "ckpt": when == "with checkpointing=True"}, _n_layers(model)))
    _perturb(model)
    if when == "after patch":
        model.gradient_checkpointing_enable()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        _, loss, grads = train_call(model, batch, ids)
    _close(loss, r_loss, what="loss")
    assert grads.keys() == r_grads.keys()
    for n in grads:
        _close(grads[n], r_grads[n], atol=1e-5, what=f"grad {n}")
    assert sum(saved) < sum(r_saved), f"checkpointing saved {sum(saved)} elements for backward, plain {sum(r_saved)}"
    if when == "with checkpointing=True":
        assert _attention_calls(model, c, batch, ids) == _attention_calls(build({**c, "ckpt": True}), c, batch, ids), \
            "both switches on must checkpoint once, as checkpointing=True alone does"


def _attention_calls(model, c, batch, ids):
    """How many times each self-attention module runs in one training step (forward + recomputes)."""
    calls = []
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: calls.append(i))
               for i, m in enumerate(m for stack in self_attention_modules(model, c["arch"]) for m in stack)]
    try:
        train_call(model, batch, ids)
    finally:
        for h in handles:
            h.remove()
    return sorted(calls)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
@pytest.mark.parametrize("arch, head", [("llama", "seqcls"), ("bert", "tokcls"), ("gpt2", "lm")])
def test_hf_trainer_with_and_without_gradient_checkpointing(tmp_path, arch, head, gradient_checkpointing):
    """Trainer with gradient_checkpointing=True trains the same prompts as without (dropout off so the
    two runs are comparable; the reference is the Trainer run without checkpointing)."""
    from torch.utils.data import Dataset

    batch, _ = make_batch(arch, head, "right")

    class Rows(Dataset):
        def __len__(self):
            return B

        def __getitem__(self, i):
            return {k: v[i] for k, v in batch.items()}

    def run(gc, out):
        model = tiny(arch, head)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        fastprompt.patch(model, num_tokens=P, start_layer=1)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        args = tf.TrainingArguments(output_dir=str(out), per_device_train_batch_size=B, max_steps=3, learning_rate=1e-2,
                                    report_to=[], save_strategy="no", gradient_checkpointing=gc, use_cpu=True,
                                    logging_steps=1, seed=0)
        tf.Trainer(model=model, args=args, train_dataset=Rows()).train()
        return before, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    before, got = run(gradient_checkpointing, tmp_path / "a")
    _, want = run(False, tmp_path / "b")
    assert got.keys() == want.keys()
    for n in got:
        _close(got[n], want[n], atol=1e-5, what=n)
    assert any(not torch.equal(got[n], before[n]) for n in got), "Trainer did not move the prompts"
