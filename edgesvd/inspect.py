"""Summarise a compressed checkpoint per layer: shape, rank, break-even, parameters, bytes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CompressionRecord, read_record
from .lowrank import break_even_rank


@dataclass
class LayerRow:
    name: str
    shape: tuple[int, int]
    rank: int | None
    break_even: float
    params_before: int
    params_after: int

    @property
    def bytes_after(self) -> int:  # float32 factors (biases excluded: they are untouched)
        return 4 * self.params_after


def layer_rows(record: CompressionRecord) -> list[LayerRow]:
    """One row per targeted layer, in model order."""
    return [LayerRow(l.name, (l.out_features, l.in_features), l.rank,
                     break_even_rank(l.out_features, l.in_features), l.params_before, l.params_after)
            for l in record.layers]


def checkpoint_summary(path: str | os.PathLike) -> tuple[CompressionRecord, list[LayerRow], int]:
    """Record, per-layer rows and the weights file size in bytes of a checkpoint folder."""
    _, record = read_record(path)
    weights = Path(path) / "model.safetensors"
    return record, layer_rows(record), weights.stat().st_size if weights.is_file() else 0
