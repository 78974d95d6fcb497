"""`fastprompt predict`: the prompts `fastprompt train` saved, applied to a data file; the outputs
carry label names (classification, tagging) or answer texts keyed by question id (QA, the official
evaluation script's input)."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

from ..serialization import load_prompts
from ..storage import PromptLoadError, read_json_object
from . import squad
from .conll import read_conll
from .loop import TASK_FILE, load_model, write_json
from .tables import Columns, DataError, read_classification
from .tasks import TASKS, Classification, QuestionAnswering, TokenTagging


def read_task_file(folder: Path) -> dict:
    """task.json of a prompts folder, validated before anything is loaded."""
    info = read_json_object(folder / TASK_FILE, "a directory written by `fastprompt train` (prompts and task.json)")
    f = folder / TASK_FILE
    if info.get("task") not in TASKS:
        raise PromptLoadError(f"{f}: 'task' must be one of {sorted(TASKS)}, got {info.get('task')!r}")
    if not isinstance(info.get("model"), str) or not isinstance(info.get("max_length"), int):
        raise PromptLoadError(f"{f}: needs 'model' (a string) and 'max_length' (an integer)")
    if info["task"] != "qa" and not (isinstance(info.get("labels"), list) and all(isinstance(x, str) for x in info["labels"])):
        raise PromptLoadError(f"{f}: needs 'labels', a list of label names")
    if info["task"] == "qa" and not all(isinstance(info.get(k), int) for k in ("doc_stride", "max_answer_length")):
        raise PromptLoadError(f"{f}: needs 'doc_stride' and 'max_answer_length' (integers)")
    return info


def _classification_items(args, info):
    saved = Columns(**info["columns"]) if info.get("columns") else None
    named = dict(text_column=args.text_column, pair_column=args.text_pair_column)
    if args.text_column is None and saved is not None:
        try:  # the training file's columns, when this file has them
            return read_classification(args.data, info["labels"], text_column=saved.text, pair_column=saved.pair, labelled=False)[0]
        except DataError:
            pass
    return read_classification(args.data, info["labels"], labelled=False, **named)[0]


def predict(args, parser) -> int:
    folder = Path(args.prompts)
    try:
        info = read_task_file(folder)
    except PromptLoadError as e:
        parser.error(f"--prompts: {e}")
    kind = info["task"]
    try:
        if kind == "seq":
            task, items = Classification([], [], info["labels"]), _classification_items(args, info)
        elif kind == "token":
            task, items = TokenTagging([], [], info["labels"]), read_conll(args.data, info["labels"], tagged=False)[0]
        else:
            items, _ = squad.read_squad(args.data)
            task = QuestionAnswering([], [], bool(info.get("squad_v2")))
    except DataError as e:
        parser.error(str(e))
    model_path = args.model or info["model"]
    try:
        tokenizer, model = load_model(task, model_path)
    except OSError as e:
        parser.error(f"--model {model_path}: cannot load ({str(e).splitlines()[0]})")
    task.prepare(tokenizer, info["max_length"], Namespace(doc_stride=info.get("doc_stride"), max_answer_length=info.get("max_answer_length", 30)))
    try:
        load_prompts(model, folder)
    except (PromptLoadError, ValueError) as e:
        parser.error(f"--prompts: {e}")
    out = task.predict(model, tokenizer, items)
    write_json(Path(args.out), out)
    print(f"{len(items)} predictions ({kind}) written to {args.out}")
    return 0
