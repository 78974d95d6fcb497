"""`fastprompt predict`: the prompts `fastprompt train` saved, applied to a data file. The task is
rebuilt from the task.json beside the prompts; its outputs carry label names (classification,
tagging), answer texts keyed by question id (QA, the official evaluation script's input) or one
generated completion per distinct input (lm, JSONL)."""

from __future__ import annotations

from pathlib import Path

from ..serialization import load_prompts
from ..storage import PromptLoadError, read_json_object
from .errors import SettingsError
from .loop import TASK_FILE
from .model_loading import load_model, pick_device
from .multitask import MULTITASK_FILE, is_multitask_output, load_headed, multitask_folder
from .settings import PredictSettings
from .tasks import TASKS, Task


def read_task_file(folder: Path) -> tuple[dict, Task]:
    """task.json of a prompts folder and the task it describes, validated before anything is loaded."""
    info = read_json_object(folder / TASK_FILE, "a directory written by `fastprompt train` (prompts and task.json)")
    f = folder / TASK_FILE
    if info.get("task") not in TASKS:
        raise PromptLoadError(f"{f}: 'task' must be one of {sorted(TASKS)}, got {info.get('task')!r}")
    if not isinstance(info.get("model"), str) or not isinstance(info.get("max_length"), int):
        raise PromptLoadError(f"{f}: needs 'model' (a string) and 'max_length' (an integer)")
    return info, TASKS[info["task"]].from_saved(info, str(f))


def predict(settings: PredictSettings) -> int:
    """Runs `fastprompt predict`; raises TrainError (or PromptLoadError) for input it cannot use,
    before writing anything."""
    settings.check()
    folder = Path(settings.prompts)
    try:
        if is_multitask_output(folder):
            folder = multitask_folder(folder, settings.task)
        elif settings.task is not None:
            raise SettingsError(f"--task {settings.task}: {folder} is not a multi-task output (no {MULTITASK_FILE})")
        info, task = read_task_file(folder)
    except PromptLoadError as e:
        raise SettingsError(f"--prompts: {e}") from None
    for name in ("num_beams", "max_new_tokens"):  # lm: generation settings other than the training run's
        if getattr(settings, name) is not None and hasattr(task, name):
            setattr(task, name, getattr(settings, name))
    items = task.read_inputs(settings)
    model_path = settings.model or info["model"]
    quantization = info.get("quantization")  # absent in task.json files written before it was recorded
    if quantization not in (None, "int8", "int4"):
        raise SettingsError(f"--prompts: task.json field 'quantization' must be null, 'int8' or 'int4', got {quantization!r}")
    if "multitask" in info:  # one dataset of a multi-task run: the backbone, its prompt and its head
        tokenizer, model = load_headed(folder, info, task, model_path, pick_device(None))
        task.prepare(tokenizer, info["max_length"])
    else:
        tokenizer, model = load_model(task, model_path, int8=quantization == "int8", int4=quantization == "int4",
                                      device=pick_device(None))
        task.prepare(tokenizer, info["max_length"])
        try:
            load_prompts(model, folder)
        except (PromptLoadError, ValueError) as e:
            raise SettingsError(f"--prompts: {e}") from None
    out = Path(settings.out or task.predictions_file)
    predictions = task.predict(model, tokenizer, items)
    task.write_predictions(out, predictions)
    print(f"{len(predictions)} predictions ({task.kind}) written to {out}")
    return 0
