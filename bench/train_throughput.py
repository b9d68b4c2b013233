"""Training throughput and utilisation: medtune vs a plain Hugging Face Trainer, one script.

    .venv/bin/python bench/train_throughput.py                 # the shipped sample data, one epoch each
    .venv/bin/python bench/train_throughput.py --data pubmedqa # PQA-L's 500 non-test items (../shared)

Both train SmolLM2-135M-Instruct with the same LoRA (r 16 on all projections), the same built
dataset (chat prompt, loss on answer tokens only), the same examples per optimizer step (8), peak
learning rate, LoRA dropout and bf16 autocast, for one epoch:

  baseline  transformers.Trainer in this process on both cores, random batches padded to their longest
  medtune   `medtune train` as `make train` runs it: 2 Ray Train workers (one core each) under
            DeepSpeed ZeRO-2, batches grouped by length, vocabulary logits only at answer positions,
            and its CPU fast path (training/cpu_fast.py: fused LoRA linears, bf16 norms, GQA attention;
            cheaper LoRA dropout; frozen weights in bf16)

Printed: real (non-pad) tokens/s in steady state (from the second step on), the ratio, eval loss on
the held-out split (both measured here by the same function), and model-FLOPs utilisation against
this machine's bf16 matmul peak measured here with all cores. The peak is measured before, between
and after the runs and the best is used: this shared machine's speed drifts (0.34-1.78 TFLOP/s
seen), and a peak taken in a slow moment would inflate MFU. MFU against the peak measured right
around the medtune run is printed beside it. Results also go to
storage/bench/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets" / "pubmedqa"


def prepare_data(storage: Path, which: str) -> tuple[Path, Path]:
    from medtune import demo
    from medtune.training import build, models, prepare

    model_dir = storage / "models" / demo.DEFAULT_MODEL
    if not (model_dir / models.IMPORT_RECORD).is_file():
        models.import_model(demo.DEFAULT_MODEL, model_dir)
    out = storage / "bench" / f"data_{which}"
    if not (out / "built" / "card.json").is_file():
        if which == "pubmedqa":
            if not (SHARED / "ori_pqal.json").is_file():
                sys.exit(f"PubMedQA not found at {SHARED}")
            prepare.prepare(str(SHARED / "ori_pqal.json"), out / "prepared.jsonl")
            build.build(out / "prepared.jsonl", "chat", str(model_dir), out / "built", ctx_len=512,
                        test_ids_file=SHARED / "test_ground_truth.json")
        else:
            prepare.prepare(str(demo.sample_dataset_path()), out / "prepared.jsonl")
            build.build(out / "prepared.jsonl", "chat", str(model_dir), out / "built", ctx_len=512)
    return model_dir, out / "built"


def eval_loss(model, dataset, pad_id: int, batch_size: int = 8, limit: int | None = None) -> float:
    """Mean cross-entropy over answer tokens of the held-out split (the same for both runs)."""
    import torch

    from medtune.training.build import IGNORE_INDEX, collate_batch
    from medtune.training.loop import answer_loss

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    total = count = 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for start in range(0, n, batch_size):
            feats = [dataset[i] for i in range(start, min(start + batch_size, n))]
            batch = collate_batch(feats, pad_id)
            total += float(answer_loss(causal_lm, batch, reduction="sum"))
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total / count


def lora_config():
    from peft import LoraConfig

    from medtune.training.config import DEFAULT_LORA_TARGETS

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=DEFAULT_LORA_TARGETS, task_type="CAUSAL_LM")


def run_baseline(model_dir: Path, built: Path, lr: float, global_batch: int, seed: int) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from medtune.training.build import collate_batch, load_built

    torch.set_num_threads(os.cpu_count() or 2)
    ds, _ = load_built(built)
    tok = AutoTokenizer.from_pretrained(built / "tokenizer")
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora_config())
    counts: list[int] = []

    def collate(features):  # padding to the longest in the batch: the Trainer default's behaviour
        batch = collate_batch([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features], tok.pad_token_id)
        counts.append(int(batch["attention_mask"].sum()))
        return batch

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(built.parent / "hf_trainer_out"), per_device_train_batch_size=global_batch,
        num_train_epochs=1, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0.05,
        bf16=True, use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], seed=seed,
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
    )
    train = ds["train"].remove_columns([c for c in ds["train"].column_names if c not in ("input_ids", "labels")])
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    steps = len(stamps)
    # Steady state: steps 2..N (step k consumed the k-th collated batch).
    tps = sum(counts[1:steps]) / (stamps[-1] - stamps[0]) if steps > 1 else float("nan")
    return {"steps": steps, "tokens": sum(counts[:steps]), "tokens_per_s": tps, "wall_s": wall,
            "eval_loss": eval_loss(model, ds["test"], tok.pad_token_id)}


def run_medtune(model_dir: Path, built: Path, storage: Path, lr: float, bs: int, seed: int) -> dict:
    import ray
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.training import checkpoints as ckpt
    from medtune.training.build import load_built
    from medtune.training.config import TrainConfig
    from medtune.training.train import run

    cfg = TrainConfig(
        model_name=str(model_dir), dataset_dir=str(built), output_dir=str(storage / "bench"),
        run_name=f"bench-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}", num_devices=2, batch_size_per_device=bs,
        num_epochs=1, learning_rate=lr, warmup_ratio=0.05, group_by_length=True, mx="bf16", seed=seed,
        ds_config=str(REPO / "training" / "configs" / "deepspeed" / "zero_2.json"), resume="never",
    )
    start = time.perf_counter()
    summary = run(cfg, ray_address="local")
    wall = time.perf_counter() - start
    ray.shutdown()
    rdir = ckpt.run_dir(storage / "bench", cfg.run_name)
    recs = [r for r in map(json.loads, (rdir / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    tps = (recs[-1]["tokens"] - recs[0]["tokens"]) / (recs[-1]["time"] - recs[0]["time"]) if len(recs) > 1 else float("nan")
    ds, _ = load_built(built)
    tok = AutoTokenizer.from_pretrained(built / "tokenizer")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), summary["checkpoint"])
    return {"steps": summary["steps"], "tokens": recs[-1]["tokens"], "tokens_per_s": tps, "wall_s": wall,
            "eval_loss": eval_loss(model, ds["test"], tok.pad_token_id), "reported_mfu": summary["mfu"]}


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from medtune.training.build import IGNORE_INDEX, load_built
    from medtune.training.monitor import body_params, measure_peak_tflops, model_flops_per_token

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["sample", "pubmedqa"], default="sample")
    ap.add_argument("--storage", type=Path, default=REPO / "storage")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    model_dir, built = prepare_data(args.storage, args.data)
    torch.set_num_threads(os.cpu_count() or 2)
    peaks = [measure_peak_tflops("cpu", seconds=2.0)]
    print(f"machine bf16 matmul peak ({torch.get_num_threads()} threads): {peaks[0]:.2f} TFLOP/s")

    ds, card = load_built(built)
    train = ds["train"]
    real = sum(len(x) for x in train["input_ids"])
    answer = sum(sum(1 for l in x[1:] if l != IGNORE_INDEX) for x in train["labels"])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfgm = model.config
    fpt = model_flops_per_token(body_params(model), cfgm.num_hidden_layers, cfgm.hidden_size, cfgm.vocab_size,
                                real / len(train), answer / real, full=False)
    del model
    print(f"data: {args.data}, {len(train)} train / {len(ds['test'])} test examples, {real} real tokens, "
          f"{100 * answer / real:.0f}% answer tokens; {fpt / 1e9:.2f} GFLOP per training token (LoRA)")

    print("\n== baseline: transformers.Trainer, pad to longest, bf16 autocast, 1 process x 2 threads ==")
    base = run_baseline(model_dir, built, args.lr, global_batch=8, seed=args.seed)
    print(json.dumps(base, indent=1))
    torch.set_num_threads(os.cpu_count() or 2)
    peaks.append(measure_peak_tflops("cpu", seconds=2.0))
    print(f"machine bf16 matmul peak, between the runs: {peaks[-1]:.2f} TFLOP/s")
    print("\n== medtune: Ray Train 2 workers x 1 thread, DeepSpeed ZeRO-2, grouped by length, answer-only head ==")
    # 4 examples per worker: 8 per optimizer step, as the baseline, so both make the same number
    # of updates per epoch.
    med = run_medtune(model_dir, built, args.storage, args.lr, bs=4, seed=args.seed)
    print(json.dumps(med, indent=1))
    torch.set_num_threads(os.cpu_count() or 2)
    peaks.append(measure_peak_tflops("cpu", seconds=2.0))
    peak = max(peaks)
    print(f"machine bf16 matmul peak, after the runs: {peaks[-1]:.2f} TFLOP/s; MFU below uses the best, {peak:.2f}")

    mfu = lambda tps: tps * fpt / (peak * 1e12)  # noqa: E731
    rows = [("baseline (HF Trainer)", base), ("medtune", med)]
    print("\n{:<24}{:>8}{:>14}{:>10}{:>12}{:>10}".format("", "steps", "real tok/s", "MFU", "eval loss", "wall s"))
    for name, r in rows:
        print(f"{name:<24}{r['steps']:>8}{r['tokens_per_s']:>14.1f}{100 * mfu(r['tokens_per_s']):>9.1f}%"
              f"{r['eval_loss']:>12.4f}{r['wall_s']:>10.0f}")
    ratio = med["tokens_per_s"] / base["tokens_per_s"]
    print(f"\nspeed-up medtune / baseline: {ratio:.2f}x (target >= 1.3x)")
    print(f"eval loss medtune - baseline: {med['eval_loss'] - base['eval_loss']:+.4f} (target <= 0)")
    print(f"medtune MFU: {100 * mfu(med['tokens_per_s']):.1f}% of {peak:.2f} TFLOP/s (target >= 30%)")
    around = max(peaks[1], peaks[2])  # the machine's speed while medtune ran, as far as it was measured
    print(f"  (against the best peak measured just before or after the medtune run, {around:.2f} TFLOP/s: "
          f"{100 * med['tokens_per_s'] * fpt / (around * 1e12):.1f}%)")
    out = args.storage / "bench" / "train_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"data": args.data, "peak_tflops": peak, "peaks_measured": peaks, "flops_per_token": fpt, "baseline": base,
                               "medtune": med, "speedup": ratio, "medtune_mfu": mfu(med["tokens_per_s"]),
                               "baseline_mfu": mfu(base["tokens_per_s"]),
                               "medtune_mfu_around_run": med["tokens_per_s"] * fpt / (around * 1e12)}, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
