"""Inspect a compressed checkpoint per layer: shape, rank, break-even, parameters, bytes, where the budget went."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .checkpoint import CompressionRecord, load_spectra, read_record, weight_files
from .factorize import break_even_rank, params_at


@dataclass
class LayerRow:
    """One targeted Linear as tables and charts show it: shape, rank kept (None: dense), bytes at
    a precision, and — when the spectrum was saved — the share of σ² kept and the mean learned score."""

    name: str
    out_features: int
    in_features: int
    rank: int | None
    bytes_per_param: int = 4
    energy_kept: float | None = None  # share of Σσ² (whitened spectrum) in the kept components
    mean_score: float | None = None  # mean learned score of the kept components (method 'learned')
    pivoted: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def break_even(self) -> float:
        return break_even_rank(self.out_features, self.in_features, self.pivoted)

    @property
    def params_before(self) -> int:
        return params_at(self.out_features, self.in_features, None)

    @property
    def params_after(self) -> int:
        return params_at(self.out_features, self.in_features, self.rank, self.pivoted)

    @property
    def bytes_dense(self) -> int:
        return self.params_before * self.bytes_per_param

    @property
    def bytes_after(self) -> int:  # weights only (biases are untouched)
        return self.params_after * self.bytes_per_param


def layer_rows(record: CompressionRecord, bytes_per_param: int = 4) -> list[LayerRow]:
    """One row per targeted layer, in model order."""
    return [LayerRow(l.name, l.out_features, l.in_features, l.rank, bytes_per_param, pivoted=l.pivoted)
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


@dataclass
class CheckpointSummary:
    """What `edgesvd inspect` shows: the record, one row per targeted layer, the weights file's size."""

    record: CompressionRecord
    rows: list[LayerRow]
    weight_bytes: int


def checkpoint_summary(path: str | os.PathLike) -> CheckpointSummary:
    """Record, per-layer rows (with spectrum columns when saved) and the weight files' size in bytes."""
    _, record = read_record(path)
    rows = layer_rows(record)
    add_spectrum_columns(rows, load_spectra(path))
    return CheckpointSummary(record, rows, sum(f.stat().st_size for f in weight_files(path)))
