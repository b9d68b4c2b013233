"""The CPU fast path for LoRA training: fewer passes over the activations.

A profile of one LoRA step of SmolLM2-135M on CPU (one thread, bf16 autocast) had the matmuls
near the bf16 peak but only ~40% of the step; most of the rest was elementwise work that the
eager PyTorch + PEFT formulation adds, not work the model needs. Each change below is exact in
fp32 and as accurate as the stock path under bf16 autocast (tests compare both against fp64):

- **One autograd function per LoRA linear** (`fuse_lora_layers`). PEFT computes
  `base(x) + B(A(dropout(x))) * s` with a cast of `x` to the adapter's dtype, a scaled dropped
  copy, a scaling pass, an add pass, and autograd sums the base and adapter gradients of `x` in
  another pass. Here the dropped copy is not rescaled (1/(1-p) and s go onto the r-wide factors),
  B, the scaling and the add are one `addmm_` into the base output, and the backward accumulates
  the base gradient into the adapter's in the same `addmm_`. The dropout mask comes from
  `drop_positions` (torch's default generator), in the same order as PEFT with `FastDropout`.
- **Norms hand bf16 to the linears** (`bf16_norm_outputs`). The residual stream stays fp32, so a
  Llama RMSNorm returns fp32 and autocast casts it once per consuming linear (q, k, v; gate, up),
  and each gradient back. Under autocast the norm now casts its output once. The norm itself goes
  through `torch.compile` (one fused loop forward and backward instead of seven passes: 3.5x on
  its own here), with eager fallback.
- **Rotary cos/sin in bf16** (`bf16_rotary`): otherwise q and k are promoted to fp32 by the
  rotation and cast back for the attention matmuls.
- **Attention** (`cpu_attention`, registered with transformers as `ATTENTION`): grouped-query
  attention without materialising repeated K/V heads (the queries of a group share one matmul),
  the scaling folded into the queries (head-dim wide, not sequence wide), the causal mask as one
  bf16 bias, and softmax in bf16 (the CPU kernel accumulates in fp32).

Written by hand because neither PyTorch eager nor PEFT fuses these on CPU, and `torch.compile`
of whole decoder layers measured slower here. GPU training never takes this path.
"""

from __future__ import annotations

import logging
import shutil
import types

import torch
from torch import nn

from medtune.training.dropout import compute_dtype, drop_positions

log = logging.getLogger(__name__)

ATTENTION = "medtune_cpu"


class Compiled:
    """`fn` through `torch.compile(dynamic=True)` (inductor's fused C++ loops), falling back to
    `fn` itself for good, with one warning, if compiling fails (no C++ compiler, say)."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = None
        self.failed = False

    def __call__(self, *args):
        if self.failed:
            return self.fn(*args)
        if self.compiled is None:
            # inductor builds C++ for CPU, the backward lazily (where a failure would not be caught
            # here): without a compiler on PATH, do not start
            if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
                self.failed = True
                log.warning("no C++ compiler on PATH (g++, c++ or clang++): %s runs eagerly", self.fn.__name__)
                return self.fn(*args)
            self.compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self.compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure: run eagerly instead
            self.failed = True
            log.warning("torch.compile of %s failed (%s: %s); running it eagerly", self.fn.__name__,
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return self.fn(*args)


def _plain_lora(layer) -> str | None:
    """The adapter name if `layer` is a PEFT LoRA Linear this path can run: one active vanilla
    adapter (no DoRA or other variant, no LoRA bias), not merged, adapters enabled."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if getattr(layer, "lora_bias", {}).get(name, False):
        return None
    return name


class _LoraLinear(torch.autograd.Function):
    """`base(x) + lora_B(lora_A(dropout(x))) * scaling` for a frozen base Linear, in `dtype`."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, p: float, scaling: float, dtype: torch.dtype):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        out = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
        pos = None
        if p > 0.0:  # the dropped copy is not rescaled: 1 / (1 - p) goes into the small factors
            pos = drop_positions(x2.numel(), p)
            x2 = x2.clone(memory_format=torch.contiguous_format)
            x2.view(-1).index_fill_(0, pos, 0)
            scaling = scaling / (1.0 - p)
        h = torch.mm(x2, a.t())
        out.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, w, a, b, h, pos)
        ctx.scaling, ctx.x_dtype, ctx.x_shape = scaling, x.dtype, x.shape
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, w, a, b, h, pos = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        grad_h = torch.mm(g, b).mul_(ctx.scaling)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_h, a)
            if pos is not None:
                grad_x.view(-1).index_fill_(0, pos, 0)
            grad_x = grad_x.addmm_(g, w).view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_a = torch.mm(grad_h.t(), x2).to(ctx.a_dtype)
        if ctx.needs_input_grad[4]:
            grad_b = torch.mm(g.t(), h).mul_(ctx.scaling).to(ctx.b_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _plain_lora(self) if not args and not kwargs and x.device.type == "cpu" else None
    base = self.base_layer
    if name is None or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return type(self).forward(self, x, *args, **kwargs)
    p = getattr(self.lora_dropout[name], "p", 0.0) if self.training else 0.0
    dtype = compute_dtype(x)
    return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                             p, self.scaling[name], dtype)


def fuse_lora_layers(model: nn.Module) -> int:
    """Give every PEFT LoRA Linear of `model` the fused forward; returns how many. A layer in a
    state the fused forward does not cover (merged, disabled, several adapters, DoRA...) falls back
    to PEFT's own forward call by call. Saved adapters are unchanged (no parameter is touched)."""
    from peft.tuners.lora.layer import Linear

    fused = 0
    for module in model.modules():
        if type(module) is Linear and type(module.base_layer) is nn.Linear and not module.fan_in_fan_out:
            module.forward = types.MethodType(_fused_lora_forward, module)
            fused += 1
    return fused


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(x.dtype)).to(out_dtype)


_rms_norm_compiled = Compiled(_rms_norm)


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    out_dtype = compute_dtype(hidden_states)
    fn = _rms_norm_compiled if getattr(self, "_medtune_compile", False) else _rms_norm
    return fn(hidden_states, self.weight, self.variance_epsilon, out_dtype)


def bf16_norm_outputs(model: nn.Module, compile: bool = False) -> int:
    """Under CPU autocast, make each Llama-style RMSNorm (a `weight` and a `variance_epsilon`)
    return the autocast dtype; returns how many norms. Same arithmetic, one cast per norm."""
    n = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_forward, module)
            module._medtune_compile = compile
            n += 1
    return n


def bf16_rotary(model: nn.Module) -> bool:
    """Under CPU autocast, hand the rotary cos/sin over in the autocast dtype."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            original = module.forward

            def forward(x, position_ids, _original=original):
                cos, sin = _original(x, position_ids)
                if torch.is_autocast_enabled("cpu"):
                    dtype = torch.get_autocast_dtype("cpu")
                    cos, sin = cos.to(dtype), sin.to(dtype)
                return cos, sin

            module.forward = forward
            return True
    return False


def bf16_tied_head(model: nn.Module) -> bool:
    """Give a frozen output head that shares the frozen fp32 input embedding its own bf16 copy
    (the values autocast would cast it to on every forward); the embedding stays fp32. Returns
    whether there was such a head. Only for training: the tie is not restored."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or head.weight is not emb.weight or emb.weight.requires_grad:
        return False
    head.weight = nn.Parameter(emb.weight.detach().to(torch.bfloat16), requires_grad=False)
    return True


_causal_bias: dict[tuple, torch.Tensor] = {}


def _causal(groups: int, q_len: int, kv_len: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The additive causal mask for `groups` stacked copies of the query rows (cached)."""
    key = (groups, q_len, kv_len, dtype, str(device))
    bias = _causal_bias.get(key)
    if bias is None:
        keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
        bias = torch.zeros(q_len, kv_len, dtype=dtype, device=device).masked_fill_(~keep, torch.finfo(dtype).min)
        bias = bias.repeat(groups, 1)
        if len(_causal_bias) > 64:
            _causal_bias.clear()
        _causal_bias[key] = bias
    return bias


def cpu_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention for transformers' `AttentionInterface` (see the module docstring). Takes the
    boolean mask of `sdpa_mask` (True = attend), or None for plain causal attention."""
    b, hq, s = query.shape[:3]
    hk, t = key.shape[1], key.shape[2]
    dtype = compute_dtype(query)
    if attention_mask is None:
        bias = _causal(hq // hk, s, t, dtype, query.device)
    else:
        bias = torch.zeros(attention_mask.shape, dtype=dtype, device=query.device)
        bias.masked_fill_(~attention_mask, torch.finfo(dtype).min)
    if (dropout and module.training) or kwargs.get("sliding_window") or query.device.type != "cpu":
        from transformers.models.llama.modeling_llama import eager_attention_forward

        mask = bias[: s] if attention_mask is None else bias  # one group's rows: the plain causal mask
        return eager_attention_forward(module, query, key, value, mask, scaling, dropout, **kwargs)
    if attention_mask is not None:  # b, 1, s, t -> b, 1, g*s, t: the same rows for every query of a group
        bias = bias.unsqueeze(2).expand(b, 1, hq // hk, s, t).reshape(b, 1, (hq // hk) * s, t)
    return _attention(query.to(dtype), key.to(dtype), value.to(dtype), bias, scaling), None


def _attention(query, key, value, bias, scaling: float):
    b, hq, s, d = query.shape
    hk = key.shape[1]
    q = (query * scaling).reshape(b, hk, (hq // hk) * s, d)
    scores = torch.matmul(q, key.transpose(2, 3)).add_(bias)  # b, hk, g*s, t; not saved for backward
    out = torch.matmul(torch.softmax(scores, dim=-1), value)  # b, hk, g*s, d
    return out.view(b, hq, s, d).transpose(1, 2).contiguous()



def register_attention() -> str:
    """Register `cpu_attention` (and sdpa's boolean mask builder) under `ATTENTION`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, cpu_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION
