"""The CPU training fast path: LoRA dropout by geometric gaps, frozen linear weights kept in bf16."""

from __future__ import annotations

import pytest
import torch

from medtune.training.dropout import FastDropout, drop_positions, use_fast_lora_dropout
from medtune.training.loop import frozen_linear_to_bf16


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_positions_are_an_independent_bernoulli_mask(p):
    torch.manual_seed(0)
    n, trials = 4000, 300
    hits = torch.zeros(n)
    pairs = 0
    for _ in range(trials):
        pos = drop_positions(n, p)
        assert bool((pos[1:] > pos[:-1]).all()) and int(pos[0]) >= 0 and int(pos[-1]) < n
        mask = torch.zeros(n, dtype=torch.bool)
        mask[pos] = True
        hits += mask
        pairs += int((mask[1:] & mask[:-1]).sum())
    rate = hits.sum() / (n * trials)
    assert abs(float(rate) - p) < 4 * (p * (1 - p) / (n * trials)) ** 0.5, float(rate)
    # Neighbours independent: both dropped with probability p^2; no position favoured.
    assert abs(pairs / ((n - 1) * trials) - p * p) < 0.15 * p * p + 1e-3
    assert abs(float(hits[: n // 2].mean() - hits[n // 2:].mean())) / trials < 0.02


def test_fast_dropout_forward_backward_and_rng_state():
    x = torch.randn(64, 96, requires_grad=True)
    drop = FastDropout(0.2)
    torch.manual_seed(7)
    y = drop(x)
    torch.manual_seed(7)
    assert torch.equal(drop(x), y), "torch.manual_seed governs the mask"
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.8)
    assert 0.15 < 1 - kept.float().mean().item() < 0.25
    y.backward(torch.ones_like(y))
    assert torch.allclose(x.grad, kept.float() / 0.8), "the gradient flows through kept positions only"
    drop.eval()
    assert drop(x) is x
    assert FastDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        FastDropout(1.0)


def test_fast_dropout_writes_the_autocast_dtype_and_returns_an_fp32_gradient():
    x = torch.randn(16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = FastDropout(0.1)(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


def _tiny_peft(tiny_model_dir, dropout):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"],
                                            task_type="CAUSAL_LM"))


def test_lora_dropout_is_replaced_and_adapters_save_the_same(tiny_model_dir, tmp_path):
    model = _tiny_peft(tiny_model_dir, 0.1)
    model.save_pretrained(tmp_path / "before")
    n_layers = model.config.num_hidden_layers
    assert use_fast_lora_dropout(model) == 3 * n_layers
    assert use_fast_lora_dropout(model) == 0, "already replaced"
    assert all(isinstance(d, FastDropout) for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values())
    model.save_pretrained(tmp_path / "after")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes()
    batch = torch.randint(3, 60, (2, 12))
    model.train()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_frozen_linear_weights_in_bf16_give_the_same_autocast_forward(tiny_model_dir):
    model = _tiny_peft(tiny_model_dir, 0.0)
    with torch.no_grad():  # a non-zero adapter, so the LoRA path counts
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.eval()
    batch = torch.randint(3, 60, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=batch).logits
    emb = model.get_input_embeddings().weight
    cast = frozen_linear_to_bf16(model)
    n_layers = model.config.num_hidden_layers
    assert cast == 7 * n_layers + (0 if model.config.tie_word_embeddings else 1)
    assert emb.dtype == torch.float32, "the embedding (and a head tied to it) stays fp32"
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(input_ids=batch).logits
    assert torch.equal(before, after), "autocast casts the same weights to the same bf16 values"
