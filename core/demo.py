"""`medtune demo` (`make demo`): the pipeline, as far as it exists, on the embedded default.

    medtune demo [--storage ./storage]

Steps: import SmolLM2-135M-Instruct from its packaged GGUF (once), prepare and build the shipped
sample dataset (illustrative records written by the project, not medical advice), and ask the
imported model one sample question. Training, serving, the chat app and evaluation join the demo
as they land. Everything is written under --storage (default $MEDTUNE_STORAGE or ./storage).
"""

from __future__ import annotations

import argparse
import os
import time
from importlib import resources
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


def sample_dataset_path() -> Path:
    """The sample dataset shipped inside the package (training/data/pubmedqa_sample.jsonl)."""
    return Path(str(resources.files("medtune.training") / "data" / "pubmedqa_sample.jsonl"))


def default_storage() -> Path:
    return Path(os.environ.get("MEDTUNE_STORAGE", "./storage"))


def run(storage: Path, prompt_type: str = "chat", ctx_len: int = 512) -> dict:
    from medtune.training import build, models, prepare, prompts
    from medtune.training.records import read_records

    timings: dict[str, float] = {}
    model_dir = storage / "models" / DEFAULT_MODEL
    t0 = time.perf_counter()
    if (model_dir / models.IMPORT_RECORD).is_file():
        print(f"[1/4] model: {model_dir} already imported")
    else:
        print(f"[1/4] model: importing {DEFAULT_MODEL} -> {model_dir}")
        models.import_model(DEFAULT_MODEL, model_dir)
    timings["model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prepared = storage / "datasets" / "sample.jsonl"
    print(f"[2/4] data prepare: {sample_dataset_path().name} -> {prepared}")
    summary = prepare.prepare(str(sample_dataset_path()), prepared)
    print(summary.format())
    timings["prepare"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    built = storage / "datasets" / "sample_built"
    print(f"[3/4] data build: prompt type {prompt_type}, ctx {ctx_len} -> {built}")
    card = build.build(prepared, prompt_type, str(model_dir), built, ctx_len=ctx_len)
    print(build.format_card(card, built))
    timings["build"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rec = read_records(prepared)[0]
    print(f"[4/4] base model answers a sample question:\n  Q: {rec.question}")
    reply = models.generate_reply(model_dir, prompts.chat_messages(rec.question, rec.context))
    print(f"  A: {reply}")
    timings["generate"] = time.perf_counter() - t0

    print("next stages (train, serve, chat, eval): not yet available")
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return {"model_dir": str(model_dir), "prepared": str(prepared), "built": str(built), "reply": reply, "card": card}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", type=Path, default=None, help="storage root (default $MEDTUNE_STORAGE or ./storage)")
    parser.add_argument("--prompt-type", default="chat", help="prompt type for the built dataset")
    parser.add_argument("--ctx-len", type=int, default=512)


def run_from_args(args: argparse.Namespace) -> int:
    run(args.storage or default_storage(), prompt_type=args.prompt_type, ctx_len=args.ctx_len)
    return 0
