"""`medtune demo` (what `make demo` runs) on the real embedded default, in a temporary storage root."""

from __future__ import annotations

import json

import pytest

from medtune import demo
from medtune.training.build import load_built


@pytest.mark.integration
def test_demo_runs_the_pipeline_so_far(tmp_path, capsys):
    result = demo.run(tmp_path / "storage")
    out = capsys.readouterr().out
    assert "[4/4]" in out and "not yet available" in out
    ds, card = load_built(result["built"])
    assert card["prompt_type"] == "chat" and card["dropped_too_long"] == 0
    assert len(ds["train"]) + len(ds["test"]) == card["source"]["records"] >= 150
    assert result["reply"].strip(), "the base model answered the sample question"
    # A second run reuses the imported model instead of converting it again.
    record = (tmp_path / "storage" / "models" / demo.DEFAULT_MODEL / "medtune_import.json").stat().st_mtime
    demo.run(tmp_path / "storage")
    assert (tmp_path / "storage" / "models" / demo.DEFAULT_MODEL / "medtune_import.json").stat().st_mtime == record
    assert "already imported" in capsys.readouterr().out
    assert json.loads((tmp_path / "storage" / "datasets" / "sample_built" / "card.json").read_text())
