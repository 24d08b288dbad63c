"""Rank arithmetic: keep ↔ rank, break-even, rounding to a hardware-friendly multiple."""

from __future__ import annotations

from .errors import ConfigError
from .lowrank import break_even_rank


def check_keep(keep: float) -> float:
    """Validate a keep ratio (parameters after ÷ before) in (0, 1]."""
    if not (0.0 < keep <= 1.0):
        raise ConfigError(f"keep must be in (0, 1], got {keep}")
    return float(keep)


def check_multiple(multiple: int) -> int:
    if multiple < 1:
        raise ConfigError(f"rank multiple must be >= 1, got {multiple}")
    return int(multiple)


def layer_keep(out_features: int, in_features: int, rank: int | None) -> float:
    """Parameters kept by one layer at `rank` (None = dense, keeps 1.0)."""
    if rank is None:
        return 1.0
    return rank * (out_features + in_features) / (out_features * in_features)


def round_rank(rank: float, multiple: int) -> int:
    """Nearest multiple of `multiple`, at least one multiple."""
    return max(multiple, int(round(rank / multiple)) * multiple)


def dense_or_rank(out_features: int, in_features: int, rank: int) -> int | None:
    """`rank`, or None when the factorized layer would be no smaller than the dense one."""
    if rank >= break_even_rank(out_features, in_features) or rank >= min(out_features, in_features):
        return None
    return rank


def uniform_rank(out_features: int, in_features: int, keep: float, multiple: int = 8) -> int | None:
    """The rank that keeps `keep` of an out×in layer, rounded; None if the layer stays dense."""
    target = keep * break_even_rank(out_features, in_features)
    return dense_or_rank(out_features, in_features, round_rank(target, multiple))
