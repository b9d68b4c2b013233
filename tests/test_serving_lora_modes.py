"""The two ways a LoRA fine-tune is served (serving/service.py): adapter and merged.

The merged copy must be the same model as base + adapter (same greedy tokens, logprobs within
float32 rounding); max_lora_rank `auto` is sized to the adapter in storage, and a later adapter
over it is refused with the setting to change; a merged copy is removed when it is retired.
"""

from __future__ import annotations

import json

import pytest
from openai import OpenAI

from conftest import publish_lora_checkpoint
from serving_util import running_app

from medtune.serving.config import ServeConfig, lora_rank_for, resolved_lora_mode


def _cfg(model, storage, **kw) -> ServeConfig:
    return ServeConfig(base_model=str(model), storage=str(storage), engine="transformers", dtype="float32", max_model_len=256,
                       max_tokens_cap=64, default_max_tokens=8, watch_interval_s=0.2, guardrails="none", **kw)


def _answer(url: str, model: str) -> tuple[str, list[float]]:
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is a beta blocker?"}],
                                       max_tokens=12, temperature=0, logprobs=True)
    return r.choices[0].message.content, [t.logprob for t in r.choices[0].logprobs.content]


def test_merged_copy_answers_as_base_plus_adapter(tmp_path, tiny_model_dir):
    storage = tmp_path / "storage"
    publish_lora_checkpoint(storage, tiny_model_dir, run_id="run-m", step=1, seed=7)
    answers = {}
    for mode in ("adapter", "merged"):
        with running_app(_cfg(tiny_model_dir, storage, lora_mode=mode, merge_dir=str(tmp_path))) as (url, service, _app, _loop):
            assert service.finetuned.mode == mode
            answers[mode] = _answer(url, "finetuned")
            base = _answer(url, "base")
            if mode == "merged":
                merged_dirs = list(tmp_path.glob("medtune-merged-*"))
                assert len(merged_dirs) == 1 and (merged_dirs[0] / "model" / "config.json").is_file()
        if mode == "merged":
            assert not list(tmp_path.glob("medtune-merged-*"))  # removed with the service
    (text_a, lp_a), (text_m, lp_m) = answers["adapter"], answers["merged"]
    assert text_a == text_m and len(lp_a) == len(lp_m) == 12
    assert max(abs(a - b) for a, b in zip(lp_a, lp_m)) < 1e-3
    assert lp_a != base[1]  # the adapter changes the model (random, non-zero LoRA weights)


def test_hot_swap_in_merged_mode_retires_the_old_copy(tmp_path, tiny_model_dir):
    storage = tmp_path / "storage"
    publish_lora_checkpoint(storage, tiny_model_dir, run_id="run-m", step=1, seed=1)
    with running_app(_cfg(tiny_model_dir, storage, lora_mode="merged", merge_dir=str(tmp_path / "merged"))) as (url, service, _app, loop):
        import asyncio

        first = service.finetuned
        publish_lora_checkpoint(storage, tiny_model_dir, run_id="run-m", step=2, seed=2)
        assert asyncio.run_coroutine_threadsafe(service.poll_once(), loop).result(60) is True
        assert service.finetuned.checkpoint == "run-m/step_2" and first.retired
        assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [service.finetuned.workdir.split("/")[-1]]
        # a corrupt checkpoint is refused before anything is merged: no directory left behind
        def corrupt(staging):
            path = staging / "adapter_model.safetensors"
            path.write_bytes(path.read_bytes()[:500])

        publish_lora_checkpoint(storage, tiny_model_dir, run_id="run-m", step=3, seed=3, before_publish=corrupt)
        assert asyncio.run_coroutine_threadsafe(service.poll_once(), loop).result(60) is False
        assert len(list((tmp_path / "merged").iterdir())) == 1
        assert _answer(url, "finetuned")[0]


def test_stale_copies_of_dead_processes_are_removed(tmp_path):
    from medtune.serving import merge

    stale = tmp_path / f"{merge.PREFIX}999999999-abc"
    stale.mkdir()
    fresh = merge.workdir(str(tmp_path))
    assert not stale.exists() and fresh.startswith(str(tmp_path / merge.PREFIX))


def test_lora_rank_auto_is_sized_to_the_adapter_and_a_bigger_one_is_refused(tmp_path, tiny_model_dir, caplog):
    storage = tmp_path / "storage"
    ckpt = publish_lora_checkpoint(storage, tiny_model_dir, run_id="run-r", step=1, seed=1)  # r = 8
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 8
    with running_app(_cfg(tiny_model_dir, storage, lora_mode="adapter")) as (url, service, _app, loop):
        import asyncio

        assert service.lora_rank == 8
        bigger = publish_lora_checkpoint(storage, tiny_model_dir, run_id="run-r", step=2, seed=2,
                                         before_publish=lambda staging: _set_rank(staging, 32))
        with caplog.at_level("WARNING", logger="medtune.serving.service"):
            assert asyncio.run_coroutine_threadsafe(service.poll_once(), loop).result(60) is False
        assert any("max_lora_rank 8" in r.message and "max_lora_rank: 32" in r.message for r in caplog.records), bigger
        assert service.finetuned.checkpoint == "run-r/step_1"


def _set_rank(staging, rank: int) -> None:
    """Claim a larger rank in the adapter config and re-seal the manifest (a well-formed checkpoint of another rank)."""
    from medtune.training import checkpoints as ck

    path = staging / "adapter_config.json"
    config = json.loads(path.read_text())
    config["r"] = rank
    path.write_text(json.dumps(config))
    manifest = ck.read_manifest(staging)
    ck.write_manifest(staging, {k: v for k, v in manifest.items() if k not in ("files", "format", "created")})


def test_modes_resolve_by_device_and_ranks_round_up():
    cfg = ServeConfig(base_model="x/y")
    assert resolved_lora_mode(cfg) in ("adapter", "merged")
    assert resolved_lora_mode(cfg.model_copy(update={"lora_mode": "adapter"})) == "adapter"
    assert [lora_rank_for(r) for r in (1, 4, 8, 9, 16, 48, 64, 300)] == [1, 8, 8, 16, 16, 64, 64, 320]
    with pytest.raises(Exception, match="merged"):
        lora_rank_for(1024)
