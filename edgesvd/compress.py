"""The compression pipeline: load → calibrate → statistics → factorize → compressed model in memory."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibration import CalibrationBatch, CalibrationConfig, sample_calibration
from .checkpoint import CompressionRecord, LayerRecord, library_versions
from .device import resolve_device
from .errors import ConfigError
from .learned import LearnedConfig, learned_compress
from .loading import DEFAULT_MODEL, ModelSource, load_model, load_tokenizer, resolve_model
from .lowrank import LowRankLinear
from .methods import METHODS, Spectrum, spectrum
from .progress import progress_bar
from .ranks import check_keep, check_multiple, uniform_rank
from .statistics import ActivationStats, collect_statistics
from .targets import linearize_conv1d, select_targets, set_submodule

ALL_METHODS = METHODS + ("learned",)
# The best method available; `edgesvd run` and `compress` use it when none is named.
DEFAULT_METHOD = "learned"


@dataclass(frozen=True)
class CompressConfig:
    """What to compress and how. Validated on construction so errors come before any work."""

    model: str = DEFAULT_MODEL
    method: str = DEFAULT_METHOD
    keep: float = 0.5
    rank_multiple: int = 8
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    device: str = "auto"
    batch_size: int = 16
    trust_remote_code: bool = False
    show_progress: bool = True
    learned: LearnedConfig = field(default_factory=LearnedConfig)  # used by method 'learned' only

    def __post_init__(self) -> None:
        check_keep(self.keep)
        check_multiple(self.rank_multiple)
        if self.method not in ALL_METHODS:
            raise ConfigError(f"unknown method '{self.method}' (choose from {', '.join(ALL_METHODS)})")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")


@dataclass
class CompressResult:
    """The compressed model (in memory), its tokenizer, the record and per-layer spectra."""

    model: nn.Module
    tokenizer: object
    record: CompressionRecord
    spectra: dict[str, dict[str, torch.Tensor]]
    source: ModelSource


@dataclass
class Prepared:
    """A loaded model with its targets, calibration sample and statistics."""

    source: ModelSource
    model: nn.Module
    tokenizer: object
    targets: list[str]
    calib: CalibrationBatch | None
    stats: ActivationStats | None
    device: torch.device


def prepare(cfg: CompressConfig, need_stats: bool = True) -> Prepared:
    """Load the model and tokenizer, pick targets, sample calibration data, collect XᵀX."""
    source = resolve_model(cfg.model)
    device = resolve_device(cfg.device)
    model = linearize_conv1d(load_model(source, cfg.trust_remote_code)).to(device)
    tokenizer = load_tokenizer(source.path, cfg.trust_remote_code)
    targets = select_targets(model, cfg.include, cfg.exclude)
    calib = stats = None
    if need_stats:
        calib = sample_calibration(tokenizer, cfg.calibration, source.family)
        stats = collect_statistics(model, targets, calib, cfg.batch_size, cfg.show_progress)
    return Prepared(source, model, tokenizer, targets, calib, stats, device)


def replace_with_factors(model: nn.Module, name: str, a: torch.Tensor, b: torch.Tensor) -> LowRankLinear:
    """Swap the Linear at `name` for a LowRankLinear holding A and B (float32, same device)."""
    dense = model.get_submodule(name)
    bias = dense.bias.detach() if dense.bias is not None else None
    low = LowRankLinear.from_factors(a.to(dense.weight), b.to(dense.weight), bias)
    set_submodule(model, name, low)
    return low


def layer_spectrum(model: nn.Module, name: str, method: str, stats: ActivationStats | None) -> Spectrum:
    """The spectrum of one target layer under a baseline method."""
    weight = model.get_submodule(name).weight.detach()
    gram = stats.gram_for(name) if stats is not None else None
    tokens = stats.tokens_for(name) if stats is not None else 0
    return spectrum(method, weight, gram, tokens)


def factorize_uniform(model: nn.Module, targets: list[str], stats: ActivationStats | None, method: str,
                      keep: float, multiple: int, show_progress: bool = True
                      ) -> tuple[list[LayerRecord], dict[str, dict[str, torch.Tensor]]]:
    """Give every target the same keep (rounded rank) and replace it by its top components."""
    layers, spectra = [], {}
    with progress_bar(f"factorize ({method})", total=len(targets), enabled=show_progress) as bar:
        for name in targets:
            dense = model.get_submodule(name)
            out_f, in_f = dense.weight.shape
            rank = uniform_rank(out_f, in_f, keep, multiple)
            layers.append(LayerRecord(name, in_f, out_f, rank, dense.bias is not None))
            if rank is not None:
                spec = layer_spectrum(model, name, method, stats)
                a, b = spec.factors(rank)
                replace_with_factors(model, name, a, b)
                kept = torch.zeros_like(spec.sigma)
                kept[:rank] = 1
                spectra[name] = {"sigma": spec.sigma, "kept": kept}
            bar.advance()
    return layers, spectra


def compress(cfg: CompressConfig) -> CompressResult:
    """Run the pipeline for `cfg` and return the compressed model; nothing is written."""
    start = time.perf_counter()
    prepared = prepare(cfg, need_stats=cfg.method != "plain")
    if cfg.method == "learned":
        layers, spectra, details = learned_compress(prepared, cfg.keep, cfg.rank_multiple, cfg.learned,
                                                    cfg.calibration.seed, cfg.show_progress)
    else:
        layers, spectra = factorize_uniform(prepared.model, prepared.targets, prepared.stats, cfg.method,
                                            cfg.keep, cfg.rank_multiple, cfg.show_progress)
        details = {}
    details.update({"wall_s": round(time.perf_counter() - start, 2), "device": str(prepared.device)})
    if prepared.stats is not None:
        details["statistics_bytes"] = prepared.stats.nbytes()
    record = CompressionRecord(
        method=cfg.method, keep_requested=cfg.keep, family=prepared.source.family,
        source_model=str(cfg.model), layers=layers, rank_multiple=cfg.rank_multiple,
        calibration=prepared.calib.summary if prepared.calib is not None else {},
        details=details, versions=library_versions(),
    )
    return CompressResult(prepared.model.cpu().eval(), prepared.tokenizer, record, spectra, prepared.source)
