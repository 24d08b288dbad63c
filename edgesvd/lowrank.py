"""The factorized Linear: two Linear layers whose product is never formed."""

from __future__ import annotations

import torch
from torch import nn


def break_even_rank(out_features: int, in_features: int) -> float:
    """Rank at which a factorized out×in layer has as many parameters as the dense one."""
    return out_features * in_features / (out_features + in_features)


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
