"""Factorized layers: the two-MatMul LowRankLinear, its parameter arithmetic, and ranks → factors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .loading import set_submodule
from .spectra import Spectrum


def break_even_rank(out_features: int, in_features: int) -> float:
    """Rank at which a factorized out×in layer has as many parameters as the dense one."""
    return out_features * in_features / (out_features + in_features)


def dense_or_rank(out_features: int, in_features: int, rank: int) -> int | None:
    """`rank`, or None when the factorized layer would be no smaller than the dense one: at or
    above break-even (or at full rank) a layer stays dense."""
    if rank >= break_even_rank(out_features, in_features) or rank >= min(out_features, in_features):
        return None
    return rank


def params_at(out_features: int, in_features: int, rank: int | None) -> int:
    """Weight parameters of an out×in layer at `rank` (None: dense); the bias is not counted."""
    return out_features * in_features if rank is None else rank * (out_features + in_features)


@dataclass
class LayerRecord:
    """One targeted Linear: its shape and the rank it was given (None: left dense)."""

    name: str
    in_features: int
    out_features: int
    rank: int | None
    bias: bool

    @property
    def params_before(self) -> int:
        return params_at(self.out_features, self.in_features, None)

    @property
    def params_after(self) -> int:
        return params_at(self.out_features, self.in_features, self.rank)


def keep_of(layers: list[LayerRecord]) -> float:
    """Parameters of the targeted layers after ÷ before (dense layers count whole)."""
    before = sum(l.params_before for l in layers)
    return sum(l.params_after for l in layers) / before if before else 1.0


class LowRankLinear(nn.Module):
    """`x ↦ b(a(x))`: `a` is r×in without bias, `b` is out×r with the original bias.

    The factors stay separate in forward and in any exported graph; multiplying them back
    would re-create the dense weight and give up the savings.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.b = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        """Build from A (r×in), B (out×r) and an optional bias (out)."""
        rank, in_features = a.shape
        out_features = b.shape[0]
        layer = cls(in_features, out_features, rank, bias=bias is not None, device=a.device, dtype=a.dtype)
        with torch.no_grad():
            layer.a.weight.copy_(a)
            layer.b.weight.copy_(b)
            if bias is not None:
                layer.b.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def replace_with_factors(model: nn.Module, name: str, a: torch.Tensor, b: torch.Tensor) -> LowRankLinear:
    """Swap the Linear at `name` for a LowRankLinear holding A and B (dtype and device of the Linear)."""
    dense = model.get_submodule(name)
    bias = dense.bias.detach() if dense.bias is not None else None
    low = LowRankLinear.from_factors(a.to(dense.weight), b.to(dense.weight), bias)
    set_submodule(model, name, low)
    return low


def apply_ranks(model: nn.Module, spectra: dict[str, Spectrum], ranks: dict[str, int | None],
                orders: dict[str, torch.Tensor] | None = None, scores: dict[str, torch.Tensor] | None = None
                ) -> tuple[list[LayerRecord], dict[str, dict[str, torch.Tensor]], list[LowRankLinear]]:
    """Factorize `model` in place: every layer of `ranks` (each a dense Linear in `model`) keeps
    its first `rank` components in `orders` (default: the σ order), scaled by `scores` when given;
    rank None leaves it dense. Every method, the learned method's finish and the budget planner
    build their models with this.

    Returns the checkpoint's layer records, its spectrum entries (`sigma`, `kept` and, with
    scores, `scores` over the whole spectrum) and the new factorized modules.
    """
    records, entries, factored = [], {}, []
    for name, rank in ranks.items():
        linear = model.get_submodule(name)
        records.append(LayerRecord(name, linear.in_features, linear.out_features, rank, linear.bias is not None))
        spec = spectra.get(name)
        if spec is None:  # rank None without a spectrum (e.g. a plain run keeping a layer dense)
            continue
        full_scores = None
        if scores is not None:
            full_scores = torch.zeros_like(spec.sigma)
            full_scores[: scores[name].numel()] = scores[name].to(full_scores)
        kept = torch.zeros_like(spec.sigma)
        if rank is None:
            kept[:] = 1
        else:
            order = orders[name] if orders is not None else torch.arange(spec.sigma.numel())
            index = order[:rank].sort().values.to(spec.sigma.device)
            a, b = spec.factors(rank, full_scores, index)
            factored.append(replace_with_factors(model, name, a, b))
            kept[index] = 1
        entries[name] = {"sigma": spec.sigma, "kept": kept}
        if full_scores is not None:
            entries[name]["scores"] = full_scores
    return records, entries, factored
