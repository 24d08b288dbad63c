"""The 4-bit weight grid of onnxruntime's MatMulNBits, in PyTorch, so fine-tuning can learn weights that survive it."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import ConfigError

# onnxruntime's symmetric 4-bit weight-only scheme, as `edgesvd export --quantize int4` asks for it
# (exporters/quantize.py): one float32 scale per INT4_BLOCK weights along the input axis, the scale the
# block's largest-magnitude weight ÷ −8, so that weight lands on code −8 exactly and the others round
# to the nearest of the codes −8…7. Checked against onnxruntime's own dequantized weights (tests).
INT4_BLOCK = 32
GRIDS = ("int4",)


def check_grid(grid: str) -> None:
    """ConfigError unless `grid` is one of GRIDS."""
    if grid not in GRIDS:
        raise ConfigError(f"unknown weight grid '{grid}' (choose from {', '.join(GRIDS)})")


def round_int4(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out×in, applied as weight·x) rounded to the int4 grid, in its own dtype."""
    out_f, in_f = weight.shape
    blocks = nn.functional.pad(weight, (0, (-in_f) % INT4_BLOCK)).reshape(out_f, -1, INT4_BLOCK)
    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    scale = extreme / -8
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return ((blocks / scale).round().clamp(-8, 7) * scale).reshape(out_f, -1)[:, :in_f]


class _OnGrid(nn.Module):
    """The weight as the quantized graph will hold it; gradients pass straight through the rounding."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (round_int4(weight.detach()) - weight).detach()


def trainable_weight(layer: nn.Linear) -> nn.Parameter:
    """The Parameter an optimizer trains for `layer`'s weight (the unrounded one while `on_grid` is active)."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


@contextmanager
def on_grid(modules: list[nn.Module], grid: str | None):
    """While active, every Linear in `modules` computes with its weight rounded to `grid` (None:
    unchanged) and trains the unrounded weight (the same Parameter an optimizer already holds); on
    exit each keeps its trained unrounded weight, which the export's quantizer rounds the same way."""
    if grid is None:
        yield
        return
    check_grid(grid)
    layers = [m for module in modules for m in module.modules() if isinstance(m, nn.Linear)]
    done: list[nn.Linear] = []
    try:
        for layer in layers:
            parametrize.register_parametrization(layer, "weight", _OnGrid())
            done.append(layer)
        yield
    finally:
        for layer in done:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)


@torch.no_grad()
def round_weights(model: nn.Module, grid: str) -> None:
    """Every Linear's and embedding's weight rounded in place to `grid`: the model as the export's
    quantizer stores it (a tied head and embedding share one weight; rounding twice changes nothing)."""
    check_grid(grid)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.copy_(round_int4(m.weight))
