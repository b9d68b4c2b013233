"""`medtune demo` (what `make demo` runs) on the real embedded default, in a temporary storage root."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtune import demo
from medtune.training import checkpoints as ckpt
from medtune.training.build import load_built


@pytest.mark.integration
def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    import ray

    storage = tmp_path / "storage"
    try:
        result = demo.run(storage, max_steps=2, ray_address="local", eval_limit=8)
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert "[7/7]" in out and "fine-tuned:" in out and "make chat" in out
    assert result["blocked"] == "content_filter"
    for name in ("report.md", "report.html", "metrics.json"):
        assert (Path(result["eval"]) / name).is_file()
    ds, card = load_built(result["built"])
    assert card["prompt_type"] == "chat" and card["dropped_too_long"] == 0
    assert len(ds["train"]) + len(ds["test"]) == card["source"]["records"] >= 150
    assert result["train"]["steps"] == 2
    assert ckpt.verify_checkpoint(ckpt.latest_checkpoint(storage))["base_model"] == result["model_dir"]
    assert result["base_reply"].strip() and result["tuned_reply"].strip()
    # A second run reuses the imported model instead of converting it again (model step only).
    record = storage / "models" / demo.DEFAULT_MODEL / "medtune_import.json"
    assert record.is_file()
