"""Shared fixtures: offline hub, GPU auto-skip, and a tiny random Llama + tokenizer built in-process.

The tiny model is saved with `save_pretrained`, so production loading code runs unchanged on it.
head_dim is 64 because vLLM's CPU attention rejects smaller heads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parents[1]
SHARED_PUBMEDQA = REPO.parent / "shared" / "datasets" / "pubmedqa"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """\
Does aspirin reduce the risk of stroke in adults with atrial fibrillation? Yes. The trial found fewer strokes.
Is early mobilisation after surgery associated with shorter hospital stay? No. Length of stay did not differ.
Maybe. The evidence is limited and the confidence intervals were wide. Context: a randomised controlled trial
of patients with diabetes, hypertension, asthma, pneumonia, sepsis, cancer, depression and chronic kidney disease.
Methods: we enrolled participants, measured blood pressure, glucose, cholesterol and mortality at one year.
Results: the intervention group had lower rates of infection and readmission; adverse events were rare.
Conclusions: the treatment appears safe and effective, but further studies are needed to confirm the benefit.
Below is an instruction that describes a task. ### Instruction: ### Input: ### Response:
"""


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def make_tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few KB of text, with BOS, EOS, PAD and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    bos = tk.token_to_id("<s>")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_llama(vocab_size: int, bos_id: int, eos_id: int, pad_id: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny random Llama (2 layers, hidden 128, head_dim 64) with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = tiny_tokenizer
    model = make_tiny_llama(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def qa(i: int, decision: str | None = "yes", **extra) -> dict:
    """A small prepared-format record."""
    rec = {
        "id": f"r{i}",
        "question": f"Does treatment {i} reduce mortality in sepsis?",
        "context": f"Methods: we enrolled participants in trial {i}.\nResults: the intervention group had lower rates.",
        "answer": f"The intervention group had lower mortality in trial {i}, so the treatment appears effective.",
        "decision": decision,
    }
    rec.update(extra)
    return rec


def publish_lora_checkpoint(storage: Path, base_dir: Path, run_id: str = "run-a", step: int = 1, seed: int = 1,
                            chat_template: str | None = None, before_publish=None) -> Path:
    """A real (random-weight) LoRA checkpoint for the tiny model, published through the storage
    contract exactly as training does it: staging dir, tokenizer, MANIFEST last, then LATEST."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.training import checkpoints as ck

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    rdir = ck.run_dir(Path(storage), run_id)
    rdir.mkdir(parents=True, exist_ok=True)
    staging = ck.staging_dir(rdir, step, f"test{seed}")
    peft_model.save_pretrained(staging)
    tok = AutoTokenizer.from_pretrained(base_dir)
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(staging)
    ck.write_manifest(staging, {"run_id": run_id, "step": step, "epoch": 0, "kind": "lora", "base_model": str(Path(base_dir).resolve()),
                                "prompt_type": "chat", "metrics": {"eval_loss": 1.0}})
    if before_publish is not None:
        before_publish(staging)
    return ck.publish(staging, Path(storage), run_id, step)
