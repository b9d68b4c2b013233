"""A cheaper dropout for LoRA training on CPU.

PEFT applies `nn.Dropout` to the input of every LoRA adapter: 7 projections x 30 layers = 210
masks per forward for SmolLM2. On CPU, torch draws every mask element from its Mersenne-Twister
generator through `bernoulli_` (about 15 ms for a 2000 x 576 activation here, ~20% of a LoRA
training step), and under bf16 autocast the dropped fp32 activation is cast to bf16 again inside
`lora_A`.

`FastDropout` draws the same thing differently. The dropped positions of a Bernoulli(p) process
are separated by Geometric(p) gaps, so it samples only the gaps (about p*n uniforms through the
inverse CDF, from torch's default generator: `torch.manual_seed` and the RNG state saved in
checkpoints still govern it), then scales the activation by 1/(1-p) and zeroes those positions.
Under autocast it writes the output in the autocast dtype directly. The backward zeroes the same
positions of the gradient. The only approximation is float32 uniforms: a gap can be at most
~log(2**-24)/log(1-p) long (324 for p=0.05), a cut-off with probability below 1e-7.

Written by hand because no library ships a faster CPU dropout. On GPU the stock `nn.Dropout`
(Philox) is already cheap and `FastDropout` defers to it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a CPU op on `t` computes in: the autocast dtype under CPU autocast, else t's own."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else t.dtype


def drop_positions(n: int, p: float) -> torch.Tensor:
    """Sorted flat indices in [0, n) where a Bernoulli(p) mask drops, each independently with
    probability p (see the module docstring)."""
    log_keep = math.log1p(-p)
    chunk = int(n * p + 6 * math.sqrt(n * p) + 16)  # almost always enough in one draw

    def gaps() -> torch.Tensor:  # Geometric(p) on {1, 2, ...} by inverse CDF
        return torch.rand(chunk).neg_().log1p_().div_(log_keep).floor_().add_(1).to(torch.int64)

    pos = gaps().cumsum_(0).sub_(1)
    while int(pos[-1]) < n:
        pos = torch.cat([pos, gaps().cumsum_(0).add_(pos[-1])])
    return pos[: int(torch.searchsorted(pos, n))]


def _scaled_and_dropped(t: torch.Tensor, dtype: torch.dtype, scale: float, pos: torch.Tensor) -> torch.Tensor:
    """A contiguous `dtype` copy of `t` times `scale`, zero at the flat indices `pos`."""
    out = t.to(dtype, copy=True, memory_format=torch.contiguous_format).mul_(scale)
    out.view(-1).index_fill_(0, pos, 0)
    return out


class _DropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, out_dtype: torch.dtype) -> torch.Tensor:
        pos = drop_positions(x.numel(), p)
        scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(pos)
        ctx.scale, ctx.in_dtype = scale, x.dtype
        return _scaled_and_dropped(x, out_dtype, scale, pos)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (pos,) = ctx.saved_tensors
        return _scaled_and_dropped(grad, ctx.in_dtype, ctx.scale, pos), None, None


class FastDropout(nn.Module):
    """Drop-in for `nn.Dropout(p)` on CPU tensors (see the module docstring)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, training=True)
        return _DropoutFn.apply(x, self.p, compute_dtype(x))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_lora_dropout(model: nn.Module) -> int:
    """Replace the `nn.Dropout` inside every PEFT LoRA layer of `model` by `FastDropout`;
    returns how many were replaced. Adapters saved afterwards are unchanged (dropout has no state)."""
    replaced = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if isinstance(drop, nn.Dropout) and drop.p > 0:
                drops[name] = FastDropout(drop.p)
                replaced += 1
    return replaced
