"""The settings of a `fastprompt train` run: which ones a resumed run takes from its checkpoint,
and their validation (each message names the flag)."""

from __future__ import annotations

import math

# settings a resumed run takes from its checkpoint (the command line gives only --resume/--log);
# later additions come last; a checkpoint written before them resumes with their defaults
RUN_SETTINGS = ("model", "data", "eval", "task", "method", "num_tokens", "start_layer", "reparam", "checkpointing", "int8",
                "int4", "epochs", "steps", "lr", "batch_size", "max_length", "out", "seed", "save_every", "checkpoint_dir",
                "cache_lower_layers", "text_column", "text_pair_column", "label_column", "doc_stride", "max_answer_length")


def check_settings(args, parser) -> None:
    """parser.error for the first bad setting."""
    for name in ("num_tokens", "epochs", "batch_size", "max_answer_length"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("steps", "max_length", "doc_stride"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.start_layer < 0:
        parser.error(f"--start-layer must be >= 0, got {args.start_layer}")
    if args.save_every < 0:
        parser.error(f"--save-every must be >= 0, got {args.save_every}")
    if args.text_pair_column is not None and args.text_column is None:
        parser.error("--text-pair-column needs --text-column (the pair's first text)")
