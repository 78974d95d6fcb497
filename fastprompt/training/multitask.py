"""Several datasets in one run on one frozen encoder: `fastprompt train --data A --data B ...`.

How the heads sit on the backbone: the model is loaded once *without* a task head
(`AutoModel`, e.g. `BertModel`, whose pooler is kept), patched once with fastprompt (one prompt
for `--share prompt`, a bank of one prompt per dataset for `--share none`), and each dataset gets
its own head module here, the one transformers' task model would put on that backbone:

- sequence classification (`SequenceHead`): pooler output (or the first token's state where the
  backbone has no pooler) -> dropout -> Linear(H, labels), as `BertForSequenceClassification`;
- token classification (`TokenHead`): dropout -> Linear(H, labels) per token, as
  `BertForTokenClassification`;
- extractive QA (`SpanHead`): Linear(H, 2) per token -> start and end logits, as
  `BertForQuestionAnswering`, with its loss (positions outside the window ignored).

One training step encodes each dataset's share of the batch with its own task, pads them to one
length on the right (a padded example's outputs equal the example's alone), runs the backbone
once on the mixed batch (with each example's prompt id for a bank), and applies each dataset's
head and loss to its own rows. The step's loss is sum_d (n_d / B) * loss_d: the mean over the
batch's examples, as one dataset's own loss is; its gradient is the same weighted sum of each
dataset's gradient alone. `HeadedModel` is one dataset's view (backbone, its head, its prompt id)
with the outputs of transformers' task models, so each task's own evaluation and prediction code
runs unchanged. Generation (lm) is not mixed: a causal LM's head and loss are not a head on a
shared encoder.

What a run writes to --out: `multitask.json` (the datasets, the sharing mode) and one folder per
dataset holding that dataset's prompt as a single-task save (the shared prompt, or its bank slot),
its head (`head.safetensors`), `task.json` and the best evaluation's predictions: `fastprompt
predict --prompts OUT --task NAME` (or `--prompts OUT/NAME`) applies one, and `fastprompt train
--init-from OUT` starts a single-task run from the shared prompt.

Prompt ensembles (`--ensemble K`, one dataset) reuse the same parts: a bank of K prompts and K
heads of the task, every example once per member in each training batch (the loss is the members'
sum, so each member's gradient is its own run's), and `EnsembleModel` for evaluation and
prediction: each example repeated K times with prompt ids 0..K-1 in one batched pass, combined by
majority vote (labels, tags) or mean span logits (QA); `Replay` scores each member from the same
pass with the task's own evaluation code.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import signal
import sys
import time
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn

from .. import patch, prompt_config, prompt_parameters, save_prompts
from ..storage import PromptLoadError, atomic_write, read_json_object
from .ensemble import EnsembleModel, evaluate_ensemble
from .errors import ModelLoadError, SettingsError
from .model_loading import default_model_path, load_model, pick_device
from .signals import Stop, StopBetweenSteps
from .task_heads import LABEL_KEYS, HeadedModel, _backbone_outputs, make_head, pad_inputs
from .tasks import TASKS, infer_task, write_json

MULTITASK_FILE = "multitask.json"
HEAD_FILE = "head.safetensors"
TASK_FILE = "task.json"
SHARES = ("prompt", "none")
# settings that name one file's columns or one task: with several --data each file's are inferred
ONE_FILE_SETTINGS = ("task", "text_column", "text_pair_column", "label_column", "target_column", "template")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


# ---------------------------------------------------------------- datasets and their names


def split_name(value: str) -> tuple[str | None, str]:
    """"NAME=path" -> (NAME, path); a plain path -> (None, path)."""
    name, sep, path = value.partition("=")
    if sep and _NAME.match(name) and "/" not in name:
        return name, path
    return None, value


def default_name(path: str) -> str:
    """The dataset's name from its file: the folder for generic file names (mrpc/train.tsv -> mrpc),
    else the file's stem."""
    p = Path(path)
    generic = {"train", "dev", "valid", "validation", "test", "eval", "data"}
    return p.parent.name if p.stem.lower() in generic and p.parent.name else p.stem


def dataset_files(data: list[str], evals: list[str] | None) -> list[tuple[str, str, str | None]]:
    """(name, train file, eval file or None) per --data, with --eval matched by name (NAME=path) or
    by order. Raises SettingsError naming the flag."""
    named = [split_name(v) for v in data]
    names = [n or default_name(p) for n, p in named]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SettingsError(f"--data: two datasets are named {dupes[0]!r}: name them, e.g. --data NAME=PATH")
    evals = [evals] if isinstance(evals, str) else list(evals or [])
    matched: dict[str, str] = {}
    split = [split_name(v) for v in evals]
    if split and all(n is not None for n, _ in split):
        for n, p in split:
            if n not in names:
                raise SettingsError(f"--eval {n}={p}: no --data is named {n!r} (datasets: {', '.join(names)})")
            matched[n] = p
    elif any(n is not None for n, _ in split):
        raise SettingsError("--eval: name every eval file (NAME=PATH) or none (matched to --data by order)")
    elif split:
        if len(split) != len(names):
            raise SettingsError(f"--eval: {len(split)} eval files for {len(names)} --data files: give one per --data, in "
                                "the same order, or name them (--eval NAME=PATH)")
        matched = {n: p for n, (_, p) in zip(names, split)}
    return [(n, p, matched.get(n)) for n, (_, p) in zip(names, named)]


def parse_mix(text: str) -> float:
    """--mix: "proportional" (temperature 1) or "temperature" / "temperature:T" (T > 0, default 2)."""
    if text == "proportional":
        return 1.0
    kind, _, value = text.partition(":")
    if kind == "temperature":
        try:
            t = float(value) if value else 2.0
        except ValueError:
            t = -1.0
        if t > 0 and math.isfinite(t):
            return t
    raise SettingsError(f"--mix must be proportional, temperature or temperature:T with T > 0, got {text!r}")


def mix_weights(sizes: list[int], temperature: float) -> list[float]:
    """Each dataset's share of the examples: N_d^(1/T) / sum_e N_e^(1/T) (T=1: proportional)."""
    w = [n ** (1.0 / temperature) for n in sizes]
    return [x / sum(w) for x in w]


class MixedBatches:
    """Batches of `batch_size` examples, each example's dataset drawn by `weights`; each dataset is
    read in a shuffled order, reshuffled when used up. Yields [(dataset, [indices])] in dataset order."""

    def __init__(self, sizes: list[int], weights: list[float], batch_size: int, rng: random.Random):
        self.sizes, self.weights, self.batch_size, self.rng = sizes, weights, batch_size, rng
        self.orders = [[] for _ in sizes]

    def _take(self, d: int, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if not self.orders[d]:
                self.orders[d] = list(range(self.sizes[d]))
                self.rng.shuffle(self.orders[d])
            out.append(self.orders[d].pop())
        return out

    def __next__(self) -> list[tuple[int, list[int]]]:
        picks = self.rng.choices(range(len(self.sizes)), weights=self.weights, k=self.batch_size)
        return [(d, self._take(d, picks.count(d))) for d in range(len(self.sizes)) if picks.count(d)]

    def __iter__(self):
        return self


class MultiTaskModel(nn.Module):
    """The patched backbone and one head per dataset; `bank`: the backbone holds one prompt per
    dataset (prompt id = dataset index), else one prompt serves all."""

    def __init__(self, backbone: nn.Module, heads: list[nn.Module], bank: bool, pad_id: int):
        super().__init__()
        self.backbone, self.heads, self.bank, self.pad_id = backbone, nn.ModuleList(heads), bank, pad_id

    def view(self, d: int) -> HeadedModel:
        return HeadedModel(self.backbone, self.heads[d], d if self.bank else None)

    def forward(self, parts: list[tuple[int, dict]], reduction: str = "mean"):
        """parts: (dataset, its encoded batch with labels). One backbone pass over all rows ->
        (sum_d n_d/B * loss_d, [each part's head outputs, cut to its own length]); reduction
        "sum": sum_d loss_d (ensemble members: each member's gradient is its own run's)."""
        inputs = pad_inputs([p for _, p in parts], self.pad_id)
        device = next(self.backbone.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        sizes = [p["input_ids"].shape[0] for _, p in parts]
        total = sum(sizes)
        prompt_ids = torch.cat([torch.full((n,), d, dtype=torch.long) for (d, _), n in zip(parts, sizes)]).to(device) if self.bank else None
        hidden, pooled = _backbone_outputs(self.backbone, inputs, prompt_ids)
        loss, outs, row = 0.0, [], 0
        for (d, p), n in zip(parts, sizes):
            length = p["input_ids"].shape[1]
            out = self.heads[d](hidden[row : row + n, :length], pooled[row : row + n])
            labels = {k: p[k].to(device) for k in LABEL_KEYS if k in p}
            loss = loss + (n / total if reduction == "mean" else 1.0) * self.heads[d].loss(out, labels)
            outs.append(out)
            row += n
        return loss, outs


# ---------------------------------------------------------------- loading the backbone


class Backbone:
    """What `load_model` needs to load the model without a task head (AutoModel)."""

    auto_class = "AutoModel"
    float_modules = ("pooler",)

    def __init__(self, tokenizer_kwargs: dict | None = None):
        self.tokenizer_kwargs = tokenizer_kwargs or {}

    def model_kwargs(self) -> dict:
        return {}

    def check_model(self, model, path: str) -> None:
        from ..integration.facade import spec_for

        stacks = spec_for(model).stacks(model)
        if model.config.is_encoder_decoder or not stacks or stacks[0].causal:
            raise ModelLoadError(f"--model {path}: several --data (or --ensemble) train heads on an encoder's outputs (BERT, RoBERTa, "
                                 f"DistilBERT); {type(model).__name__} is not one")


def load_backbone(path: str, kinds: set[str], int8: bool, int4: bool, device):
    """(tokenizers by task kind, the backbone): one model; each kind's tokenizer as its task loads it."""
    tokenizers, model = {}, None
    for kind in sorted(kinds):
        if model is None:
            tokenizers[kind], model = load_model(Backbone(TASKS[kind].tokenizer_kwargs), path, int8, int4, device)
        else:
            import transformers

            from .model_loading import model_location

            where, extra = model_location(path)
            kw = {"gguf_file": extra["gguf_file"]} if extra else {}
            tokenizers[kind] = transformers.AutoTokenizer.from_pretrained(where, **TASKS[kind].tokenizer_kwargs, **kw)
            if tokenizers[kind].pad_token is None:
                tokenizers[kind].pad_token = tokenizers[kind].eos_token
    return tokenizers, model


# ---------------------------------------------------------------- saving and loading one dataset


def save_heads(heads: list[nn.Module], folder: Path) -> None:
    """One head's tensors by their names; an ensemble's K heads as "<member>.<name>"."""
    tensors = {}
    for i, head in enumerate(heads):
        for k, v in head.state_dict().items():
            tensors[k if len(heads) == 1 else f"{i}.{k}"] = v.detach().cpu().contiguous()
    atomic_write(folder / HEAD_FILE, safetensors.torch.save(tensors))


def load_heads(kind: str, config, task, folder: Path, count: int = 1) -> list[nn.Module]:
    """The `count` heads save_heads wrote, validated by name and shape."""
    heads = [make_head(kind, config, task) for _ in range(count)]
    f = folder / HEAD_FILE
    try:
        tensors = safetensors.torch.load(f.read_bytes())
    except OSError:
        raise PromptLoadError(f"{f}: no such file") from None
    except Exception as e:  # safetensors' own error types
        raise PromptLoadError(f"{f}: not a valid safetensors file ({e})") from None
    expected = {(k if count == 1 else f"{i}.{k}"): tuple(v.shape) for i, h in enumerate(heads) for k, v in h.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        raise PromptLoadError(f"{f}: tensors {sorted(got.items())} do not match {count} {kind} head(s) {sorted(expected.items())}")
    for i, h in enumerate(heads):
        h.load_state_dict({k: tensors[k if count == 1 else f"{i}.{k}"] for k in h.state_dict()})
    return heads


def multitask_folder(folder: Path, name: str | None, flag: str = "--task") -> Path:
    """The folder of dataset `name` in a multi-task output (the only one when name is None)."""
    info = read_json_object(folder / MULTITASK_FILE, "a directory written by a multi-task `fastprompt train`")
    names = info.get("datasets")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise PromptLoadError(f"{folder / MULTITASK_FILE}: needs 'datasets', a list of names")
    if name is None:
        if len(names) > 1:
            raise SettingsError(f"{flag}: {folder} holds {len(names)} datasets ({', '.join(names)}): pick one with {flag} NAME")
        name = names[0]
    if name not in names:
        raise SettingsError(f"{flag} {name}: {folder} holds {', '.join(names)}")
    return folder / name


def load_headed(folder: Path, info: dict, task, model_path: str, device):
    """(tokenizer, HeadedModel or EnsembleModel) for a dataset folder of a multi-task or ensemble
    output, frozen, on device."""
    from ..serialization import load_prompts

    quantization = info.get("quantization")
    tokenizers, backbone = load_backbone(model_path, {task.kind}, quantization == "int8", quantization == "int4", device)
    members = (info.get("multitask") or {}).get("ensemble") or 1
    try:
        load_prompts(backbone, folder)
        heads = load_heads(task.kind, backbone.config, task, folder, members)
    except (PromptLoadError, ValueError) as e:
        raise SettingsError(f"--prompts: {e}") from None
    for h in heads:
        h.to(device).requires_grad_(False)
    # an ensemble: every example once per member, in one batched pass, combined
    model = EnsembleModel(backbone, heads) if members > 1 else HeadedModel(backbone, heads[0])
    return tokenizers[task.kind], model


def resolve_init_from(path: str) -> Path:
    """--init-from: a folder with a saved prompt, or a multi-task output sharing one prompt."""
    folder = Path(path)
    if (folder / MULTITASK_FILE).is_file():
        try:
            info = read_json_object(folder / MULTITASK_FILE, "a multi-task output")
        except PromptLoadError as e:
            raise SettingsError(f"--init-from: {e}") from None
        names = info.get("datasets") or []
        if info.get("ensemble", 1) > 1:
            raise SettingsError(f"--init-from {path}: an ensemble holds {info['ensemble']} prompts, not one to start from")
        if info.get("share") != "prompt" and len(names) != 1:
            raise SettingsError(f"--init-from {path}: a --share none output holds one prompt per dataset ({', '.join(names)}): "
                                f"pass --init-from {path}/NAME")
        return folder / names[0]
    if not (folder / "fastprompt.json").is_file():
        raise SettingsError(f"--init-from {path}: no saved prompts there (fastprompt.json or {MULTITASK_FILE})")
    return folder


# ---------------------------------------------------------------- the run


def _score(metrics: dict, task) -> float:
    """The selection metric on a 0-1 scale (QA's F1 is 0-100), so datasets average fairly."""
    value = metrics[task.metric]
    return value / 100 if task.kind == "qa" else value


def check_settings(s, several: bool) -> None:
    """Multi-task / ensemble specific checks (SettingsError naming the flag)."""
    if s.share not in SHARES:
        raise SettingsError(f"--share must be one of {list(SHARES)}, got {s.share!r}")
    parse_mix(s.mix)
    if several:
        for name in ONE_FILE_SETTINGS:
            if getattr(s, name) is not None:
                raise SettingsError(f"--{name.replace('_', '-')} applies to one --data; with several, each file's task and columns are inferred")
        if s.ensemble > 1:
            raise SettingsError("--ensemble trains K prompts for one --data; with several --data use --share none")
    if several and s.sweep:
        raise SettingsError("--sweep tries prompt lengths and learning rates for one --data")
    what = "multi-task" if several else "--ensemble"
    if s.resume is not None:
        raise SettingsError(f"--resume: {what} runs are not resumable (no checkpoints are written)")
    if s.cache_lower_layers:
        raise SettingsError(f"--cache-lower-layers is for single-prompt runs, not {what} ones")
    if s.init_from is not None:
        raise SettingsError(f"--init-from starts a single-prompt run; a {what} run starts from fresh prompts")


def read_datasets(s, several: bool) -> list[tuple[str, object]]:
    """[(name, Task)] for every --data, read with its own --eval (an ensemble: its one --data)."""
    if not several:
        kind = s.task or infer_task(s.data, s.target_column)
        if kind == "lm":
            raise SettingsError("--ensemble: generation (lm) is not ensembled; ensembles are for classification, tagging and QA")
        sub = copy.copy(s)
        sub.task = kind
        return [(default_name(s.data) if s.data else "sentiment", TASKS[kind].read(sub))]
    out = []
    for name, data, evalf in dataset_files(s.data, s.eval):
        kind = infer_task(data)
        if kind == "lm":
            raise SettingsError(f"--data {data}: generation (lm) data cannot be mixed with other datasets; train it alone")
        sub = copy.copy(s)
        sub.data, sub.eval, sub.task = data, evalf, kind
        out.append((name, TASKS[kind].read(sub)))
    return out


def train_multitask(settings) -> int:
    """`fastprompt train` with several --data (one run, mixed batches, one head per dataset) or
    with --ensemble K (one dataset, K prompts and heads trained together, every example once per
    member in each batch)."""
    from tqdm import tqdm

    from .loop import _headline, peak_rss_mib

    s = settings
    s.check()
    several = isinstance(s.data, (list, tuple))
    check_settings(s, several)
    random.seed(s.seed)
    torch.manual_seed(s.seed)
    datasets = read_datasets(s, several)
    members = 1 if several else s.ensemble
    device = pick_device(s.device)
    model_path = s.model or default_model_path()
    tokenizers, backbone = load_backbone(model_path, {t.kind for _, t in datasets}, s.int8, s.int4, device)
    for name, task in datasets:
        task.prepare(tokenizers[task.kind], s.max_length or task.default_max_length)
        if not task.train_items:
            raise SettingsError(f"--data {name}: no trainable examples")
    bank = members > 1 or s.share == "none"
    try:
        patch(backbone, method=s.method, num_tokens=s.num_tokens, start_layer=s.start_layer, reparam=s.reparam,
              checkpointing=s.checkpointing, init_text=s.init_text, prefix_init=s.prefix_init, tokenizer=tokenizers[datasets[0][1].kind],
              num_tasks=members if members > 1 else len(datasets) if bank else 1)
    except ValueError as e:
        raise SettingsError(str(e)) from None
    torch.manual_seed(s.seed)
    # an ensemble's members start from different draws: K heads here, K bank slots in patch
    heads = [make_head(task.kind, backbone.config, task) for _, task in datasets for _ in range(members)]
    pad_id = tokenizers[datasets[0][1].kind].pad_token_id or 0
    model = MultiTaskModel(backbone, heads, bank, pad_id).to(device)
    params = prompt_parameters(backbone) + list(model.heads.parameters())
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in backbone.parameters()) + sum(p.numel() for p in model.heads.parameters())
    sizes = [len(t.train_items) for _, t in datasets]
    weights = mix_weights(sizes, parse_mix(s.mix))
    print(f"model {model_path}")
    for (name, task), n, w in zip(datasets, sizes, weights):
        labels = f", labels {task.labels}" if task.labels is not None else ""
        share = f", {100 * w:.1f}% of each batch" if several else ""
        print(f"data {name} ({task.kind}): {task.describe()}, {n} train {task.unit}, {len(task.eval_items)} eval{share}{labels}")
    what = f"multi-task, --share {s.share}" if several else f"ensemble of {members} prompts (a bank, each example once per member)"
    print(f"{what}: method {s.method}, P={prompt_config(backbone).num_tokens}, start_layer={s.start_layer}, "
          f"{len(heads)} heads: {n_trainable:,} trainable of {n_total:,} parameters")

    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(sum(sizes) / s.batch_size)
    total = min(s.steps or steps_per_epoch * s.epochs, steps_per_epoch * s.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / max(total, 1))
    mixer = MixedBatches(sizes, weights, s.batch_size, random.Random(s.seed))
    out_dir = Path(s.out)
    quantization = "int8" if s.int8 else "int4" if s.int4 else None
    has_eval = any(t.eval_items for _, t in datasets)
    best, best_metrics, best_members, best_epoch, step, seen = -math.inf, None, None, 0, 0, 0
    log = open(s.log, "a", encoding="utf-8") if s.log else None
    ensemble = EnsembleModel(backbone, list(model.heads)) if members > 1 else None

    def keep(predictions=None):
        out_dir.mkdir(parents=True, exist_ok=True)
        for d, (name, task) in enumerate(datasets):
            folder = out_dir / name
            save_prompts(backbone, folder, task=d if bank and members == 1 else None)
            save_heads(list(model.heads)[d * members : (d + 1) * members], folder)
            extra = {"share": s.share} if several else {"ensemble": members}
            write_json(folder / TASK_FILE, {"task": task.kind, "model": model_path, "max_length": task.max_length,
                                            "quantization": quantization, "multitask": {**extra, "dataset": name}, **task.settings()})
            if predictions is not None and predictions[d] is not None:
                task.write_predictions(folder / task.predictions_file, predictions[d])
        summary = {"datasets": [n for n, _ in datasets], "share": s.share if several else "ensemble", "ensemble": members,
                   "mix": s.mix, "model": model_path, "best_metrics": best_metrics}
        if best_members is not None:
            summary["member_metrics"] = best_members
        write_json(out_dir / MULTITASK_FILE, summary)

    def evaluate():
        metrics, predictions, member_metrics = {}, [], None
        for d, (name, task) in enumerate(datasets):
            if not task.eval_items:
                predictions.append(None)
                continue
            if ensemble is not None:
                m, p, member_metrics = evaluate_ensemble(task, ensemble, tokenizers[task.kind])
            else:
                m, p = task.evaluate(model.view(d), tokenizers[task.kind])
            metrics[name] = m
            predictions.append(p)
        return metrics, predictions, member_metrics

    def batch_parts():
        picked = next(mixer)
        parts = [(d, datasets[d][1].encode(tokenizers[datasets[d][1].kind], [datasets[d][1].train_items[i] for i in idx]))
                 for d, idx in picked]
        if members > 1:  # every example once per member: each member trains on the whole batch
            return [(k, parts[0][1]) for k in range(members)], "sum"
        return parts, "mean"

    start = time.perf_counter()
    model.train()
    bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)
    stopper = StopBetweenSteps(tqdm.write)
    epoch = 0
    try:
        with stopper:
            while step < total:
                epoch += 1
                for _ in range(steps_per_epoch):
                    if step >= total:
                        break
                    parts, reduction = batch_parts()
                    loss, _ = model(parts, reduction)
                    loss.backward()
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    seen += s.batch_size
                    if log is not None:
                        log.write(json.dumps({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]}) + "\n")
                        log.flush()
                    bar.set_postfix(loss=f"{loss.item():.3f}", ex_s=f"{seen / (time.perf_counter() - start):.0f}", mem=f"{peak_rss_mib():.0f}MiB")
                    bar.update()
                    stopper.check()
                if has_eval:
                    metrics, predictions, member_metrics = evaluate()
                    for name, task in datasets:
                        if name in metrics:
                            tqdm.write(f"epoch {epoch}: {name} eval {_headline(metrics[name], task)}")
                    for k, m in enumerate(member_metrics or []):
                        tqdm.write(f"epoch {epoch}:   member {k} eval {_headline(m, datasets[0][1])}")
                    score = sum(_score(metrics[n], t) for n, t in datasets if n in metrics) / len(metrics)
                    if score > best:
                        best, best_metrics, best_members, best_epoch = score, metrics, member_metrics, epoch
                        keep(predictions)
                stopper.check()
    except (Stop, KeyboardInterrupt) as e:
        bar.close()
        keep()
        print(f"\ninterrupted at step {step}: prompts and heads saved to {s.out} (these runs do not resume)", file=sys.stderr)
        return 143 if isinstance(e, Stop) and e.signum == signal.SIGTERM else 130
    finally:
        if log is not None:
            log.close()
    bar.close()
    if not has_eval:
        keep()
    elapsed = time.perf_counter() - start
    print("summary")
    for name, task in datasets:
        if best_metrics and name in best_metrics:
            label = "ensemble" if members > 1 else name
            print(f"  {label:<15} eval {_headline(best_metrics[name], task)}")
    for k, m in enumerate(best_members or []):
        print(f"  {f'member {k}':<15} eval {_headline(m, datasets[0][1])}")
    if has_eval:
        print(f"  best epoch      {best_epoch} (mean score {best:.3f}; prompts and heads saved from it)")
    print(f"  trainable       {n_trainable:,} parameters ({100 * n_trainable / n_total:.2f}% of {n_total:,})")
    print(f"  steps           {step} in {elapsed:.1f} s ({seen / elapsed:.0f} examples/s)")
    print(f"  peak memory     {peak_rss_mib():.0f} MiB (process RSS)")
    print(f"  saved           {out_dir.resolve()}")
    return 0


def is_multitask_output(folder: Path) -> bool:
    return (folder / MULTITASK_FILE).is_file()


__all__ = ["HeadedModel", "MixedBatches", "MultiTaskModel", "dataset_files", "load_headed",
           "mix_weights", "parse_mix", "train_multitask"]
