"""`medtune train`: real Ray Train + DeepSpeed runs on a tiny Llama (2 CPU workers over gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medtune.training import checkpoints as ckpt
from medtune.training.build import build
from medtune.training.config import TrainConfig
from medtune.training.train import format_summary, ray_runtime_env, run

from conftest import REPO, qa, write_jsonl

pytestmark = pytest.mark.integration
DS = REPO / "training" / "configs" / "deepspeed"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env=ray_runtime_env(), log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    decisions = ["yes", "no", "maybe"]
    src = write_jsonl(root / "ds.jsonl", [qa(i, decisions[i % 3]) for i in range(96)])
    build(src, "1", str(tiny_model_dir), root / "built", ctx_len=128, test_split=0.2)
    return root / "built"


@pytest.fixture(scope="module")
def built_markers(tmp_path_factory, tiny_model_dir) -> Path:
    """The seed's <START_Q> format: four tokens added to the vocabulary."""
    root = tmp_path_factory.mktemp("train-data-markers")
    src = write_jsonl(root / "ds.jsonl", [qa(i, ["yes", "no", "maybe"][i % 3]) for i in range(96)])
    build(src, "2", str(tiny_model_dir), root / "built", ctx_len=128, test_split=0.2)
    return root / "built"


def _cfg(tiny_model_dir, built, storage, **kw) -> TrainConfig:
    base = dict(
        model_name=str(tiny_model_dir), dataset_dir=str(built), output_dir=str(storage), num_devices=2,
        batch_size_per_device=4, eval_batch_size_per_device=8, ctx_len=128, learning_rate=5e-3,
        warmup_ratio=0.0, ds_config=str(DS / "zero_2.json"), log_every_steps=1, peak_tflops=1.0,
        compile=False,  # compiling the norms costs each worker seconds; test_zero2_... turns it on
    )
    base.update(kw)
    return TrainConfig(**base)


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_zero2_lora_trains_publishes_resumes_and_prunes(ray_local, tmp_path, tiny_model_dir, built):
    import torch
    from transformers import AutoModelForCausalLM

    storage = tmp_path / "storage"
    cfg = _cfg(tiny_model_dir, built, storage, run_name="z2", max_steps=6, save_every_steps=2, num_checkpoints_to_keep=2,
               group_by_length=True, compile=True)  # the shipped default's batching and CPU fast path (compiled norms too)
    summary = run(cfg)
    assert (summary["engine"], summary["zero_stage"], summary["backend"]) == ("DeepSpeedEngine", 2, "gloo")
    text = format_summary(summary)
    assert "real tokens/s" in text and "network" in text and summary["network"][0]["node"]
    rdir = storage / "runs" / "z2"
    train = _records(rdir, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert train[-1]["loss"] < train[0]["loss"], "training lowers the loss"
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in train)
    # Published, verified, and LATEST (run and storage-wide) names the last step.
    latest = ckpt.latest_checkpoint(storage)
    assert latest == rdir / "step_000006" == ckpt.latest_checkpoint(storage, "z2")
    manifest = ckpt.verify_checkpoint(latest)
    assert manifest["step"] == 6 and manifest["kind"] == "lora" and manifest["prompt_type"] == "1"
    assert "eval_perplexity" in manifest["metrics"]
    # Retention: keep 2 of steps 2, 4, 6.
    assert [s for s, _ in ckpt.list_checkpoints(rdir)] == [4, 6]
    # LoRA: adapters moved off their zero init; base weights untouched.
    adapter = _tensors(latest / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    assert not any("lora" not in k for k in adapter), "only adapter weights are saved"
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    tuned = PeftModel.from_pretrained(base, str(latest))
    for name, value in tuned.get_base_model().state_dict().items():
        key = name.replace(".base_layer", "")
        if key in original:
            assert torch.equal(value, original[key]), name
    # The checkpoint carries the tokenizer and the chat template of the training prompt.
    assert "### Instruction" in (latest / "chat_template.jinja").read_text()

    # Resume: continues at step 7, not at 1; optimizer state and data position come back.
    summary2 = run(cfg.model_copy(update={"max_steps": 8}))
    assert summary2["steps"] == 8
    steps = [r["step"] for r in _records(rdir, "train")]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    assert ckpt.verify_checkpoint(ckpt.latest_checkpoint(storage))["step"] == 8


def test_killed_worker_recovers_from_last_checkpoint(ray_local, tmp_path, tiny_model_dir, built_markers):
    """Also the marker prompt format: resized embeddings train and are saved with the adapter."""
    storage = tmp_path / "storage"
    cfg = _cfg(tiny_model_dir, built_markers, storage, run_name="fault", max_steps=5, save_every_steps=2,
               fault_at_step=3, max_failures=1)
    summary = run(cfg)
    rdir = storage / "runs" / "fault"
    assert (rdir / ".fault_injected").is_file(), "the fault really fired"
    assert summary["steps"] == 5
    steps = [r["step"] for r in _records(rdir, "train")]
    # Steps after the step-2 checkpoint ran again after the restart; none before it did.
    assert steps.count(1) == 1 and steps.count(2) == 1 and steps[-1] == 5 and 3 in steps
    latest = ckpt.latest_checkpoint(storage)
    assert ckpt.verify_checkpoint(latest)["step"] == 5
    adapter = _tensors(latest / "adapter_model.safetensors")
    assert any("embed_tokens" in k for k in adapter), "the grown embedding table is saved"
    assert "<START_Q>" in (latest / "chat_template.jinja").read_text()


def test_zero3_lora_saves_gathered_adapter(ray_local, tmp_path, tiny_model_dir, built):
    storage = tmp_path / "storage"
    # Two epochs asked for, but an (unreachable-to-miss) perplexity target stops it after the first.
    cfg = _cfg(tiny_model_dir, built, storage, run_name="z3", num_epochs=2, batch_size_per_device=8,
               stop_perplexity=1e9, ds_config=str(DS / "zero_3.json"))
    summary = run(cfg)
    assert (summary["engine"], summary["zero_stage"]) == ("DeepSpeedEngine", 3)
    assert summary["stopped_early"] and summary["epochs"] == 1 and summary["steps"] == 4
    evals = _records(storage / "runs" / "z3", "eval")
    assert len(evals) == 1 and evals[0]["eval_perplexity"] > 1
    latest = ckpt.latest_checkpoint(storage)
    ckpt.verify_checkpoint(latest)
    adapter = _tensors(latest / "adapter_model.safetensors")
    assert adapter and all(v.numel() > 0 for v in adapter.values())


def test_zero3_full_finetune_saves_loadable_model(ray_local, tmp_path, tiny_model_dir, built):
    import torch
    from transformers import AutoModelForCausalLM

    storage = tmp_path / "storage"
    cfg = _cfg(tiny_model_dir, built, storage, run_name="full", max_steps=2, lora=False, learning_rate=1e-3,
               ds_config=str(DS / "zero_3_llama_2_7b.json"))
    run(cfg)
    latest = ckpt.latest_checkpoint(storage)
    assert ckpt.verify_checkpoint(latest)["kind"] == "full"
    tuned = AutoModelForCausalLM.from_pretrained(latest)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed, "full fine-tuning changes the base weights"
