"""The CPU fast path of training/cpu_fast.py: one autograd function per LoRA linear, norms and
rotary handing bf16 to the matmuls, grouped-query attention. Each is checked against the stock
transformers + PEFT computation: equal in fp32, and no less accurate than it under bf16 autocast
(both measured against an fp64 run)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from medtune.training import cpu_fast
from medtune.training.dropout import use_fast_lora_dropout

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft(tiny_model_dir, dropout, attn="eager"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():  # non-zero adapters, so the LoRA path counts in outputs and gradients
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    use_fast_lora_dropout(model)
    return model


def _fast(model):
    model = copy.deepcopy(model)
    assert cpu_fast.fuse_lora_layers(model) == 7 * model.config.num_hidden_layers
    assert cpu_fast.bf16_norm_outputs(model) == 2 * model.config.num_hidden_layers + 1
    assert cpu_fast.bf16_rotary(model)
    model.get_base_model().config._attn_implementation = cpu_fast.register_attention()
    return model


def _run(model, ids, autocast, seed=5, mask=None):
    """Logits and the LoRA gradients of one training forward/backward."""
    model.train()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, attention_mask=mask).logits
    logits.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return logits.double(), grads


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fast_path_equals_peft_in_fp32_with_the_same_dropout_masks(tiny_model_dir, dropout):
    ref = _peft(tiny_model_dir, dropout)
    fast = _fast(ref)
    ids = torch.randint(3, 60, (3, 19))
    logits_ref, grads_ref = _run(ref, ids, autocast=False)
    logits_fast, grads_fast = _run(fast, ids, autocast=False)
    assert _rel(logits_fast, logits_ref) < 1e-5, _rel(logits_fast, logits_ref)
    assert grads_ref.keys() == grads_fast.keys() and len(grads_ref) == 14 * ref.config.num_hidden_layers
    for name in grads_ref:
        assert _rel(grads_fast[name], grads_ref[name]) < 1e-4, name


def test_fast_path_is_as_accurate_as_peft_under_bf16_autocast(tiny_model_dir):
    ref = _peft(tiny_model_dir, 0.1)
    fast = _fast(ref)
    truth = copy.deepcopy(ref).double()
    ids = torch.randint(3, 60, (4, 23))
    logits_true, grads_true = _run(truth, ids, autocast=False)
    logits_ref, grads_ref = _run(ref, ids, autocast=True)
    logits_fast, grads_fast = _run(fast, ids, autocast=True)
    err_ref, err_fast = _rel(logits_ref, logits_true), _rel(logits_fast, logits_true)
    assert 0 < err_fast < 1.5 * err_ref + 1e-3, (err_fast, err_ref)
    worse = [n for n in grads_true if _rel(grads_fast[n], grads_true[n]) > 1.5 * _rel(grads_ref[n], grads_true[n]) + 1e-2]
    assert not worse, worse
    assert all(g.dtype == torch.float32 for g in grads_fast.values())


def test_attention_with_a_padding_mask_matches_eager(tiny_model_dir):
    ref = _peft(tiny_model_dir, 0.0)
    fast = _fast(ref)
    ids = torch.randint(3, 60, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: the mask is kept and goes through sdpa's boolean mask
    mask[2, :1] = 0
    logits_ref, grads_ref = _run(ref, ids, autocast=False, mask=mask)
    logits_fast, grads_fast = _run(fast, ids, autocast=False, mask=mask)
    real = mask.bool()
    assert _rel(logits_fast[real], logits_ref[real]) < 1e-5
    assert all(_rel(grads_fast[n], grads_ref[n]) < 1e-4 for n in grads_ref)


def test_attention_falls_back_to_eager_with_the_causal_mask(tiny_model_dir):
    ref = _peft(tiny_model_dir, 0.0)
    fast = _fast(ref)
    ids = torch.randint(3, 60, (2, 10))
    for layer in fast.get_base_model().model.layers:  # attention dropout: a case the fallback handles
        layer.self_attn.attention_dropout = 1e-9
    logits_ref, _ = _run(ref, ids, autocast=False)
    logits_fast, _ = _run(fast, ids, autocast=False)
    assert _rel(logits_fast, logits_ref) < 1e-5, "a future token leaked into the eager fallback"


def test_fused_lora_leaves_other_states_to_peft_and_saves_the_same_adapter(tiny_model_dir, tmp_path):
    model = _peft(tiny_model_dir, 0.1)
    model.save_pretrained(tmp_path / "before")
    fast = _fast(model)
    fast.save_pretrained(tmp_path / "after")
    name = "adapter_model.safetensors"
    assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes()

    def config(which):  # target_modules is a set: its order in the JSON follows the copy's hashing
        cfg = json.loads((tmp_path / which / "adapter_config.json").read_text())
        return {**cfg, "target_modules": sorted(cfg["target_modules"])}

    assert config("before") == config("after")
    ids = torch.randint(3, 60, (2, 9))
    fast.eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(fast(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
        with fast.disable_adapter():  # PEFT's own forward runs: the base model alone
            no_adapter = fast(input_ids=ids).logits
        with model.disable_adapter():
            assert torch.allclose(no_adapter, model(input_ids=ids).logits, atol=1e-5)
        fast.merge_adapter()  # merged: PEFT's forward again, same function
        assert torch.allclose(fast(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


def test_tied_head_gets_a_bf16_copy_with_the_same_autocast_logits(tiny_model_dir):
    model = _peft(tiny_model_dir, 0.0).get_base_model()
    ids = torch.randint(3, 60, (2, 9))
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids).logits
    assert model.config.tie_word_embeddings and cpu_fast.bf16_tied_head(model)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.get_input_embeddings().weight.dtype == torch.float32
    assert not cpu_fast.bf16_tied_head(model), "no longer tied"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(input_ids=ids).logits, before)


def test_compiled_norm_matches_eager_and_falls_back_when_compiling_fails(monkeypatch, caplog):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norms = [LlamaRMSNorm(64) for _ in range(2)]
    with torch.no_grad():
        for n in norms:
            n.weight.normal_(1, 0.1)
    eager, compiled = copy.deepcopy(norms[0]), copy.deepcopy(norms[0])
    cpu_fast.bf16_norm_outputs(eager)
    cpu_fast.bf16_norm_outputs(compiled, compile=True)
    x = torch.randn(2, 7, 64, requires_grad=True)
    outs = []
    for norm in (eager, compiled):
        xx = x.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(xx)
        assert y.dtype == torch.bfloat16
        y.float().pow(2).sum().backward()
        outs.append((y.float(), xx.grad, norm.weight.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-2)
    with torch.no_grad():
        assert norms[1](x).dtype == torch.float32  # untouched outside the fast path

    def broken(*args, **kwargs):
        raise RuntimeError("the compiler crashed")

    no_compiler = cpu_fast.Compiled(lambda t: t * 3)
    with monkeypatch.context() as m, caplog.at_level("WARNING"):
        m.setattr(cpu_fast.shutil, "which", lambda name: None)
        m.setattr(torch, "compile", broken)  # must not even be tried
        assert torch.equal(no_compiler(torch.ones(2)), torch.full((2,), 3.0)) and no_compiler.failed
    assert "no C++ compiler" in caplog.text

    fallback = cpu_fast.Compiled(lambda t: t * 2)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    with caplog.at_level("WARNING"):
        assert torch.equal(fallback(torch.ones(3)), torch.full((3,), 2.0))
        assert torch.equal(fallback(torch.ones(3)), torch.full((3,), 2.0))
    assert fallback.failed and caplog.text.count("running it eagerly") == 1
