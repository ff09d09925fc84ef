"""`python -m training <command>`: one entry point for the training tools.

Commands are registered by name -> (module, function, one-line help) and imported only when
run, so `--help` is instant and one command's heavy imports never slow another. A command's
function takes the remaining argv and returns an exit code; it builds its own argparse parser,
so `python -m training <command> --help` shows that command's options. The registered modules
are the commands' torch-free command lines (`*_cli`), which import the command's code only once
its arguments parse, so a command's `--help` and argument errors are instant too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str, str]] = {
    "synth": ("training.synth_cli", "main_synth", "generate a synthetic labelled data set of shapes"),
    "finetune": ("training.finetune_cli", "main_finetune", "fine-tune the CLIP2SAM head on an export or COCO file"),
    "evaluate": ("training.evaluate_cli", "main_evaluate", "mask IoU and accuracy with GT box / centre-point prompts"),
    "vocab": ("training.vocab_cli", "main_vocab", "text embeddings of a label set with a model's text tower"),
    "dump-sam-features": ("training.dump_features_cli", "main_dump_sam_features", "SAM image embeddings for distillation"),
    "distill": ("training.distill_cli", "main_distill", "SAM2CLIP: distil SAM's image encoder into the neck"),
    "demo-model": ("training.demo_model", "main_demo_model", "reproduce the offline demo model (synthetic data, from scratch)"),
    "job": ("training.job_cli", "main_job", "one backend training job from its folder (the backend runs it)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description="Training tools for OVSAM in Label Studio.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (_, _, help_text) in COMMANDS.items():
        # add_help=False: the command's own parser answers --help with its real options.
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = build_parser().parse_args(argv[:1]).command
    module, function, _ = COMMANDS[command]
    return int(getattr(importlib.import_module(module), function)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
