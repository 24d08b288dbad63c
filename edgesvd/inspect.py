"""Summarise a compressed checkpoint per layer: shape, rank, break-even, parameters, bytes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CompressionRecord, load_spectra, read_record
from .lowrank import break_even_rank


@dataclass
class LayerRow:
    name: str
    shape: tuple[int, int]
    rank: int | None
    break_even: float
    params_before: int
    params_after: int
    energy_kept: float | None = None  # share of Σσ² (whitened spectrum) in the kept components
    mean_score: float | None = None  # mean learned score of the kept components (method 'learned')

    @property
    def bytes_after(self) -> int:  # float32 factors (biases excluded: they are untouched)
        return 4 * self.params_after


def layer_rows(record: CompressionRecord) -> list[LayerRow]:
    """One row per targeted layer, in model order."""
    return [LayerRow(l.name, (l.out_features, l.in_features), l.rank,
                     break_even_rank(l.out_features, l.in_features), l.params_before, l.params_after)
            for l in record.layers]


def add_spectrum_columns(rows: list[LayerRow], spectra: dict) -> None:
    """Fill where the budget went from spectrum.safetensors: kept σ² energy and mean learned score."""
    for row in rows:
        entry = spectra.get(row.name)
        if not entry or "sigma" not in entry or "kept" not in entry:
            continue
        kept = entry["kept"].bool()
        energy = entry["sigma"].double() ** 2
        row.energy_kept = float(energy[kept].sum() / energy.sum().clamp_min(1e-30))
        if "scores" in entry and kept.any() and row.rank is not None:
            row.mean_score = float(entry["scores"][kept].abs().mean())


def checkpoint_summary(path: str | os.PathLike) -> tuple[CompressionRecord, list[LayerRow], int]:
    """Record, per-layer rows (with spectrum columns when saved) and the weights file size in bytes."""
    _, record = read_record(path)
    weights = Path(path) / "model.safetensors"
    rows = layer_rows(record)
    add_spectrum_columns(rows, load_spectra(path))
    return record, rows, weights.stat().st_size if weights.is_file() else 0
