"""`medtune demo` (`make demo`): the pipeline, as far as it exists, on the embedded default.

    medtune demo [--storage ./storage] [--max-steps N]

Steps: import SmolLM2-135M-Instruct from its packaged GGUF (once); prepare and build the shipped
sample dataset (illustrative records written by the project, not medical advice); fine-tune it
with LoRA on 2 local Ray Train workers under DeepSpeed ZeRO-2 (one epoch, a few minutes on 2
cores); then ask the base and the fine-tuned model the same held-out question. Serving, the chat
app and evaluation join the demo as they land. Everything is written under --storage (default
$MEDTUNE_STORAGE or ./storage).
"""

from __future__ import annotations

import argparse
import os
import time
from importlib import resources
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
TRAIN_CONFIG = Path(__file__).resolve().parent.parent / "training" / "configs" / "smollm2_sample.yaml"


def sample_dataset_path() -> Path:
    """The sample dataset shipped inside the package (training/data/pubmedqa_sample.jsonl)."""
    return Path(str(resources.files("medtune.training") / "data" / "pubmedqa_sample.jsonl"))


def default_storage() -> Path:
    return Path(os.environ.get("MEDTUNE_STORAGE", "./storage"))


def run(storage: Path, prompt_type: str = "chat", ctx_len: int = 512, max_steps: int | None = None,
        ray_address: str | None = None) -> dict:
    from medtune.training import build, models, prepare, prompts
    from medtune.training import train as train_stage
    from medtune.training.config import build_config, load_yaml
    from medtune.training.records import read_records

    storage = Path(storage)
    timings: dict[str, float] = {}
    model_dir = storage / "models" / DEFAULT_MODEL
    t0 = time.perf_counter()
    if (model_dir / models.IMPORT_RECORD).is_file():
        print(f"[1/5] model: {model_dir} already imported")
    else:
        print(f"[1/5] model: importing {DEFAULT_MODEL} -> {model_dir}")
        models.import_model(DEFAULT_MODEL, model_dir)
    timings["model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prepared = storage / "datasets" / "sample.jsonl"
    print(f"[2/5] data prepare: {sample_dataset_path().name} -> {prepared}")
    summary = prepare.prepare(str(sample_dataset_path()), prepared)
    print(summary.format())
    timings["prepare"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    built = storage / "datasets" / "sample_built"
    print(f"[3/5] data build: prompt type {prompt_type}, ctx {ctx_len} -> {built}")
    card = build.build(prepared, prompt_type, str(model_dir), built, ctx_len=ctx_len)
    print(build.format_card(card, built))
    timings["build"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print(f"[4/5] train: {TRAIN_CONFIG.name} (LoRA, DeepSpeed ZeRO-2, 2 Ray workers)")
    values = load_yaml(TRAIN_CONFIG)
    values.update(model_name=str(model_dir), dataset_dir=str(built), output_dir=str(storage),
                  ds_config=str(TRAIN_CONFIG.parent / "deepspeed" / "zero_2.json"), config_name="demo")
    if max_steps:
        values.update(max_steps=max_steps, save_every_steps=None)
    train_summary = train_stage.run(build_config(values, where=str(TRAIN_CONFIG)), ray_address=ray_address)
    print(train_stage.format_summary(train_summary))
    timings["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    test_ids = set(build.load_built(built)[0]["test"]["id"])
    rec = next(r for r in read_records(prepared) if r.id in test_ids)
    messages = prompts.chat_messages(rec.question, rec.context)
    print(f"[5/5] a held-out question, base vs fine-tuned:\n  Q: {rec.question}\n  reference: {prompts.answer_text(rec.answer, rec.decision)}")
    base_reply = models.generate_reply(model_dir, messages)
    tuned_reply = models.generate_reply(model_dir, messages, adapter=train_summary["checkpoint"])
    print(f"  base:       {base_reply}\n  fine-tuned: {tuned_reply}")
    timings["generate"] = time.perf_counter() - t0

    print("next stages (serve, chat, eval): not yet available")
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return {"model_dir": str(model_dir), "prepared": str(prepared), "built": str(built), "card": card,
            "train": train_summary, "base_reply": base_reply, "tuned_reply": tuned_reply}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", type=Path, default=None, help="storage root (default $MEDTUNE_STORAGE or ./storage)")
    parser.add_argument("--prompt-type", default="chat", help="prompt type for the built dataset")
    parser.add_argument("--ctx-len", type=int, default=512)
    parser.add_argument("--max-steps", type=int, default=None, help="cap the training steps (default: one epoch)")


def run_from_args(args: argparse.Namespace) -> int:
    run(args.storage or default_storage(), prompt_type=args.prompt_type, ctx_len=args.ctx_len, max_steps=args.max_steps)
    return 0
