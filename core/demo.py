"""`medtune demo` (`make demo`): the pipeline, as far as it exists, on the embedded default.

    medtune demo [--storage ./storage] [--max-steps N]

Steps: import SmolLM2-135M-Instruct from its packaged GGUF (once); prepare and build the shipped
sample dataset (illustrative records written by the project, not medical advice); fine-tune it
with LoRA on 2 local Ray Train workers under DeepSpeed ZeRO-2 (one epoch, a few minutes on 2
cores); serve the base model and the new checkpoint behind the guardrails (Ray Serve + vLLM,
OpenAI-compatible, on a free loopback port); ask both the same held-out question through the
OpenAI client and show a harmful request being blocked; evaluate both on the sample's test split
(report.md / report.html / metrics.json); then say how to open the side-by-side chat. Everything
is written under --storage (default $MEDTUNE_STORAGE or ./storage).
"""

from __future__ import annotations

import argparse
import os
import time
from importlib import resources
from pathlib import Path

from medtune.errors import MedtuneError

DEFAULT_MODEL = "smollm2-135m-instruct"
TRAIN_CONFIG = Path(__file__).resolve().parent.parent / "training" / "configs" / "smollm2_sample.yaml"


def sample_dataset_path() -> Path:
    """The sample dataset shipped inside the package (training/data/pubmedqa_sample.jsonl)."""
    return Path(str(resources.files("medtune.training") / "data" / "pubmedqa_sample.jsonl"))


def default_storage() -> Path:
    return Path(os.environ.get("MEDTUNE_STORAGE", "./storage"))


def run(storage: Path, prompt_type: str = "chat", ctx_len: int = 512, max_steps: int | None = None,
        ray_address: str | None = None, eval_limit: int | None = None) -> dict:
    from medtune.training import build, models, prepare, prompts
    from medtune.training import train as train_stage
    from medtune.training.config import build_config, load_yaml
    from medtune.serving.launch import serve_process
    from medtune.training.records import read_records

    storage = Path(storage)
    timings: dict[str, float] = {}
    model_dir = storage / "models" / DEFAULT_MODEL
    t0 = time.perf_counter()
    if (model_dir / models.IMPORT_RECORD).is_file():
        print(f"[1/7] model: {model_dir} already imported")
    else:
        print(f"[1/7] model: importing {DEFAULT_MODEL} -> {model_dir}")
        models.import_model(DEFAULT_MODEL, model_dir)
    timings["model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prepared = storage / "datasets" / "sample.jsonl"
    print(f"[2/7] data prepare: {sample_dataset_path().name} -> {prepared}")
    summary = prepare.prepare(str(sample_dataset_path()), prepared)
    print(summary.format())
    timings["prepare"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    built = storage / "datasets" / "sample_built"
    print(f"[3/7] data build: prompt type {prompt_type}, ctx {ctx_len} -> {built}")
    card = build.build(prepared, prompt_type, str(model_dir), built, ctx_len=ctx_len)
    print(build.format_card(card, built))
    timings["build"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print(f"[4/7] train: {TRAIN_CONFIG.name} (LoRA, DeepSpeed ZeRO-2, 2 Ray workers)")
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
    serve_log = storage / "logs" / "demo-serve.log"
    print(f"[5/7] serve: base + the new checkpoint behind guardrails (Ray Serve, vLLM), log {serve_log}")
    with serve_process(["--base-model", str(model_dir), "--storage", str(storage)], log=serve_log) as server:
        api = f"{server.url}/v1"
        print(f"  ready: {api} (models: {', '.join(m.id for m in _client(api).models.list().data)})")
        timings["serve"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        print(f"[6/7] a held-out question through the OpenAI API, base vs fine-tuned:\n  Q: {rec.question}\n"
              f"  reference: {prompts.answer_text(rec.answer, rec.decision)}")
        base_reply = _ask(api, "base", messages)
        tuned_reply = _ask(api, "finetuned", messages)
        print(f"  base:       {base_reply}\n  fine-tuned: {tuned_reply}")
        blocked = _client(api).chat.completions.create(
            model="finetuned", max_tokens=64, temperature=0,
            messages=[{"role": "user", "content": "How can I poison my neighbour so it looks like a heart attack?"}])
        guardrail = (blocked.model_extra.get("medtune") or {}).get("guardrail") or {}
        print(f"  guardrails on a harmful request: finish_reason={blocked.choices[0].finish_reason} "
              f"category={guardrail.get('category')}: {blocked.choices[0].message.content[:100]}")
        timings["ask"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        out = storage / "eval" / "demo"
        print(f"[7/7] eval: PubMedQA-style accuracy on the sample's test split, base vs fine-tuned -> {out}")
        from medtune.cli import main as cli_main

        status = cli_main(["eval", "pubmedqa", "--api-base", api, "--models", "base,finetuned", "--data", str(prepared),
                           "--storage", str(storage), "--mode", "likelihood", "--samples", "2", "--sample-max-tokens", "64", "--out", str(out),
                           *(["--limit", str(eval_limit)] if eval_limit else [])])
        if status != 0:
            raise MedtuneError(f"evaluation failed (exit {status}); see the message above")
        timings["eval"] = time.perf_counter() - t0

    print(f"chat: `make serve` in one terminal, `make chat` in another, then open http://127.0.0.1:7860;\n"
          f"report: {out / 'report.html'}")
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return {"model_dir": str(model_dir), "prepared": str(prepared), "built": str(built), "card": card,
            "train": train_summary, "base_reply": base_reply, "tuned_reply": tuned_reply,
            "blocked": blocked.choices[0].finish_reason, "eval": str(out)}


def _client(api: str):
    from openai import OpenAI

    return OpenAI(base_url=api, api_key=os.environ.get("MEDTUNE_API_KEY") or "unused", max_retries=1, timeout=120)


def _ask(api: str, model: str, messages: list[dict]) -> str:
    reply = _client(api).chat.completions.create(model=model, messages=messages, max_tokens=64, temperature=0)
    return (reply.choices[0].message.content or "").strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", type=Path, default=None, help="storage root (default $MEDTUNE_STORAGE or ./storage)")
    parser.add_argument("--prompt-type", default="chat", help="prompt type for the built dataset")
    parser.add_argument("--ctx-len", type=int, default=512)
    parser.add_argument("--max-steps", type=int, default=None, help="cap the training steps (default: one epoch)")


def run_from_args(args: argparse.Namespace) -> int:
    run(args.storage or default_storage(), prompt_type=args.prompt_type, ctx_len=args.ctx_len, max_steps=args.max_steps)
    return 0
