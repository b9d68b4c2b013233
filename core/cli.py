"""The `medtune` command line: one console script, one subcommand per stage.

    medtune data prepare --source ori_pqal.json --output storage/datasets/pqal.jsonl
    medtune data build --dataset-path storage/datasets/pqal.jsonl --prompt-type chat --model DIR --output-dir OUT
    medtune model import smollm2-135m-instruct --output storage/models/smollm2-135m-instruct
    medtune demo            # the whole pipeline, as far as it exists, on the embedded default

`main(argv) -> int` parses and dispatches to each stage's `run_from_args`; stages raise
`MedtuneError` for bad input, which is printed without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from medtune import __version__
from medtune.errors import MedtuneError
from medtune.logs import setup_logging

# Stage modules, each providing `add_arguments(parser)` and `run_from_args(args)` and
# documenting itself in its docstring (the --help text). A stage whose module is not part
# of this build yet is listed as pending: it says so and exits 2.
STAGES = [
    # (group, name, module, help, extra parser defaults)
    ("data", "prepare", "medtune.training.prepare", "convert a PubMedQA-style source to prepared JSONL", {}),
    ("data", "build", "medtune.training.build", "tokenize prepared JSONL into masked train/test splits", {}),
    (None, "model", "medtune.training.models", "import a base model as a HF directory", {}),
    (None, "train", "medtune.training.train", "fine-tune on Ray Train workers with DeepSpeed ZeRO + LoRA", {}),
    (None, "submit", "medtune.training.submit", "submit `medtune train ...` to a Ray / KubeRay cluster as a job",
     {"wants_rest": True}),
    (None, "serve", "medtune.serving.cli", "OpenAI-compatible Ray Serve + vLLM service, base and fine-tuned", {}),
    (None, "guard", "medtune.guardrails.cli", "check text against the guardrails policy", {}),
    (None, "chat", "medtune.chatbot.cli", "Gradio app, base and fine-tuned side by side", {}),
    (None, "eval", "medtune.evaluation.cli", "PubMedQA accuracy, base vs fine-tuned", {}),
    (None, "demo", "medtune.demo", "run the pipeline on the embedded default (sample data, SmolLM2-135M)", {}),
]


def _stage_module(name: str):
    """Import a stage module, or None when this build does not have it yet."""
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:  # the module exists but one of its own imports is missing
            raise
        return None


def pending_stages() -> dict[str, str]:
    return {name: help_text for _, name, module, help_text, _ in STAGES if _stage_module(module) is None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtune",
        description="Fine-tune an open LLM on medical QA, serve it behind guardrails, compare it with its base.",
    )
    parser.add_argument("--version", action="version", version=f"medtune {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING ...")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="prepare and build datasets")
    groups = {None: sub, "data": data.add_subparsers(dest="data_command", metavar="{prepare,build}", required=True)}
    for group, name, module_name, help_text, extra in STAGES:
        module = _stage_module(module_name)
        if module is None:
            stage = groups[group].add_parser(name, help=f"{help_text} (not yet available)")
            stage.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            stage.set_defaults(handler=_pending(name, help_text))
            continue
        stage = groups[group].add_parser(name, help=help_text, description=module.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(stage)
        stage.set_defaults(handler=module.run_from_args, **extra)
    return parser


def _pending(name: str, what: str):
    def handler(_args: argparse.Namespace) -> int:
        print(f"medtune {name}: not yet available ({what})", file=sys.stderr)
        return 2

    return handler


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `submit` passes everything it does not know on to `medtune train` on the cluster.
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "wants_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    setup_logging(args.log_level)
    try:
        if getattr(args, "wants_rest", False):
            return int(args.handler(args, rest) or 0)
        if getattr(args, "command", None) == "train":
            full = list(argv if argv is not None else sys.argv[1:])
            args.train_argv = full[full.index("train") + 1:]
        return int(args.handler(args) or 0)
    except MedtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
