"""Budgets on devices: the cost model of a profile, what an export measures against it, and plan previews."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgesvd.calibration import CalibrationConfig
from edgesvd.compression import prepare
from edgesvd.costmodel import CostModel, ModelFacts, model_facts
from edgesvd.errors import DeviceError
from edgesvd.factorize import LayerRecord, keep_of
from edgesvd.families import Family
from edgesvd.importance import whitened_importances
from edgesvd.methods import Whiten
from edgesvd.planner import Receipt, plan_ranks
from edgesvd.profiles import BUDGET_LABELS, Budget, Profile, load_profiles
from edgesvd.reporting import SILENT, Reporter
from edgesvd.spectra import spectra_of
from edgesvd.units import fmt_quantity

from .export import ExportConfig, onnx_files_bytes
from .microbench import measure_layers
from .profiling import (
    CONFIDENCE,
    MIN_WINDOWS,
    WINDOW,
    WINDOW_QUANTILE,
    Interval,
    PairedLatency,
    ProfileConfig,
    ProfileReport,
    paired_latency,
    weight_matmul_split,
    with_pairs,
)
from .profiling import profile as profile_onnx
from .providers import CUDA, SessionConfig, cuda_status
from .quantize import QUANTIZATIONS


def is_local(profile: Profile) -> bool:
    """True when the profile's device is this machine, so its latency can be measured here."""
    return profile.device.measure


def require_measurable(profiles: Sequence[Profile]) -> None:
    """A profile that measures this machine's GPU needs one that works; a one-line DeviceError
    before any work otherwise."""
    for p in profiles:
        if is_local(p) and p.runtime.execution_provider == CUDA:
            usable, reason = cuda_status()
            if not usable:
                raise DeviceError(f"profile {p.name} measures this machine's GPU with the CUDA execution provider, "
                                  f"but {reason}")


def cost_model_for(profile: Profile, facts: ModelFacts, measure: bool = True, reporter: Reporter = SILENT) -> CostModel:
    """The CostModel for `profile`: on the host, latency of every layer shape at every candidate
    rank is timed under onnxruntime (cached while it stays true); elsewhere it is calibrated or estimated."""
    if measure and is_local(profile):
        rt = profile.runtime
        bench = measure_layers(list(facts.layers), profile.workload.tokens(facts.family), profile.rank_multiple,
                               rt.execution_provider, rt.threads, rt.precision, reporter=reporter)
        return CostModel(profile, facts, bench.table, table_info=bench.info)
    return CostModel(profile, facts)


def export_config_for(base: ExportConfig, profile: Profile, family: Family) -> ExportConfig:
    """The export a profile runs: its precision, and the pooled output where the family has one."""
    precision = profile.runtime.precision
    return replace(base, dtype="fp16" if precision == "fp16" else "fp32",
                   quantize=precision if precision in QUANTIZATIONS else None,
                   pooled=base.pooled and family.pooled_output)


def at_export_precision(profiles: Sequence[Profile], export: ExportConfig) -> list[Profile]:
    """The profiles at the precision the user asked for (`--quantize`, `--dtype fp16`): it
    overrides the profiles' own, so the plan counts bytes as the export stores them; the default
    fp32 leaves every profile as written."""
    if export.precision == "fp32":
        return list(profiles)
    return [replace(p, runtime=replace(p.runtime, precision=export.precision)) for p in profiles]


def plan_keep(receipt: Receipt) -> float:
    """Targeted parameters a plan keeps (dense layers count whole)."""
    return keep_of([LayerRecord(r.name, r.shape[1], r.shape[0], r.rank, False, r.pivoted and r.rank is not None)
                    for r in receipt.rows])


# -- what a measurement can claim ---------------------------------------------------------------------
MET, MISSED, UNDECIDED = "met", "missed", "cannot certify"


@dataclass
class Verdict:
    """One budget judged on a measurement, in the budget's units (a ratio to dense for relative
    latency budgets, ms for absolute ones, bytes for sizes): the median and its interval, the
    certified `bound` (see PairedLatency.bound; a size's exact value), the limit and the status:
    met only when the bound is within the limit, missed when even the interval's lower end is
    beyond it, else it cannot be certified."""

    key: str
    budget: str
    interval: Interval
    bound: float
    limit: float
    status: str
    pairs: int = 0
    load_average: float | None = None

    @property
    def use(self) -> float:
        """Certified bound ÷ limit: at most 1 when met."""
        return self.bound / self.limit

    @property
    def spread(self) -> float:
        """How far the certified bound lies above the median, relative to it."""
        return self.bound / self.interval.estimate - 1 if math.isfinite(self.bound) else math.inf

    @property
    def relative(self) -> bool:
        return "dense" in self.budget

    def to_json(self) -> dict:
        return {"key": self.key, "budget": self.budget, "status": self.status, "limit": self.limit,
                "interval": self.interval.to_json(), "bound": self.bound if math.isfinite(self.bound) else None,
                "confidence": CONFIDENCE if self.pairs else None, "window_quantile": WINDOW_QUANTILE if self.pairs else None,
                "pairs": self.pairs, "load_average": self.load_average}

    def __str__(self) -> str:
        label = BUDGET_LABELS[self.key]
        if not self.pairs:
            return f"{label} {fmt_quantity(self.key, self.interval.estimate)} of {fmt_quantity(self.key, self.limit)}: {self.status}"
        unit = (lambda v: f"{v:.3f}×") if self.relative else (lambda v: f"{v:.2f} ms")
        i = self.interval
        text = (f"{label} {unit(i.estimate)} [{unit(i.low)}, {unit(i.high)}], {100 * WINDOW_QUANTILE:g}% of windows "
                f"≤ {unit(self.bound)}, limit {unit(self.limit)} ({100 * CONFIDENCE:g}% confidence, {self.pairs} pairs, "
                f"load average {self.load_average:.2f}): {self.status}")
        if self.status == UNDECIDED:
            text += f": measurement spread {100 * self.spread:.1f}%"
        return text


def _status(interval: Interval, bound: float, limit: float) -> str:
    if bound <= limit:
        return MET
    return MISSED if interval.low > limit else UNDECIDED


def judge(budgets: dict[str, Budget], limits: dict[str, float], values: dict[str, float],
          pairs: PairedLatency | None) -> dict[str, Verdict]:
    """Every budget judged: sizes on their exact values, latency on the paired measurement
    (relative budgets on the ratio to the dense model, absolute ones on the compressed model's
    own times; p90 budgets on the windows' 90th percentiles)."""
    out = {}
    for key, b in budgets.items():
        if key.startswith("latency") and pairs is not None:
            q = 0.5 if key == "latency_p50" else 0.9
            what = "ratio" if b.relative is not None else "compressed"
            interval, bound = pairs.interval(what, q), pairs.bound(what, q)
            limit = b.relative if b.relative is not None else b.absolute
            out[key] = Verdict(key, str(b), interval, bound, limit, _status(interval, bound, limit), pairs.pairs,
                               pairs.load)
        elif key in values:
            exact = Interval(values[key], values[key], values[key], 1.0)
            out[key] = Verdict(key, str(b), exact, values[key], limits[key], _status(exact, values[key], limits[key]))
    return out


def decided(verdicts: dict[str, Verdict]) -> bool:
    return all(v.status != UNDECIDED for v in verdicts.values())


@dataclass
class PlanMeasurement:
    """What one export measured on this machine: its values (bytes, peak memory, p50 and p90), the
    dense model's latency measured beside it, the paired measurement, every budget's verdict, and
    the profiling report for the bundle."""

    values: dict[str, float]
    dense: dict[str, float]
    pairs: PairedLatency | None
    verdicts: dict[str, Verdict]
    report: dict

    @property
    def met(self) -> bool:
        return all(v.status == MET for v in self.verdicts.values())


@dataclass(frozen=True)
class Measuring:
    """How exports are measured on this machine: repetitions of the single-model runs (peak memory,
    the report), warm-up, session options, and the most pairs a latency verdict may take."""

    runs: int = 30
    warmup: int = 5
    session: SessionConfig = SessionConfig()
    max_pairs: int = 960


def _profile_config(profile: Profile, family: Family, how: Measuring, runs: int) -> ProfileConfig:
    w = profile.workload
    return ProfileConfig(batch=w.batch, seq_len=w.seq_len(family), warmup=how.warmup, runs=runs,
                         eps=(profile.runtime.execution_provider,), session=how.session)


def _values(report: ProfileReport, label: str, folder: Path) -> dict[str, float]:
    """Size, latency and (on the CPU) peak memory measured for one model. On the CUDA EP the
    process's RSS is not the GPU's memory, so peak memory is left to the estimate."""
    m = next(x for x in report.measurements if x.model == label)
    stats = m.modes["prefill" if "prefill" in m.modes else next(iter(m.modes))]
    values = {"model_bytes": float(onnx_files_bytes(folder)), "latency_p50": stats["p50_ms"],
              "latency_p90": stats["p90_ms"]}
    if m.provider != CUDA:
        values["peak_memory"] = m.peak_rss_mb * 1e6
    return values


def measure_dense(dense_dir: Path, profile: Profile, family: Family, targets: Sequence[str], how: Measuring
                  ) -> dict[str, float]:
    """The dense export on this machine: size, peak memory and latency, and `layer_share`, the
    share of its kernel time spent in the MatMuls of the `targets` (what factorization changes),
    from a node-level trace: what ties the cost model to the whole model."""
    cfg = _profile_config(profile, family, how, how.runs)
    values = _values(profile_onnx(dense_dir, None, replace(cfg, runs=min(how.runs, 10))), "compressed", dense_dir)
    split = weight_matmul_split(dense_dir, replace(cfg, runs=20), profile.runtime.execution_provider, targets)
    return {**values, "latency_p50": split["p50_ms"], "latency_p90": split["p90_ms"],
            "layer_share": split["targeted_ms"] / split["total_ms"]}


def tied(cost: CostModel, dense_dir: Path, profile: Profile, family: Family, how: Measuring
         ) -> tuple[CostModel, dict[str, float]]:
    """`cost` tied to the dense export measured on this machine (measure_dense), and what it measured."""
    measured = measure_dense(dense_dir, profile, family, [s.name for s in cost.facts.layers], how)
    share = measured.pop("layer_share")
    return cost.anchored_to(measured["latency_p50"], measured["latency_p90"], share), measured


def measure_export(onnx_dir: Path, dense_dir: Path, profile: Profile, family: Family, limits: dict[str, float],
                   how: Measuring) -> PlanMeasurement:
    """One export against the dense one on this machine at the profile's workload.

    Latency: the two are timed in pairs in one process (paired_latency) and the pairs continue
    (up to `how.max_pairs`) until every latency budget is decided. Size and peak memory: the
    export's files and a run of each model in its own process. Returns the verdict of every budget."""
    budgets = profile.budgets
    cfg = _profile_config(profile, family, how, how.runs)
    first = max(how.max_pairs // 4, 1)
    timed = "prefill" if family.causal else "forward"
    report = profile_onnx(onnx_dir, dense_dir, replace(cfg, runs=min(how.runs, 10)))
    values, dense = _values(report, "compressed", onnx_dir), _values(report, "dense", dense_dir)

    def enough(pl: PairedLatency) -> bool:
        return decided(judge({k: b for k, b in budgets.items() if k.startswith("latency")}, limits, values, pl))

    pairs = paired_latency(dense_dir, onnx_dir, replace(cfg, runs=first), profile.runtime.execution_provider,
                           modes=(timed,), decided=enough, max_pairs=how.max_pairs,
                           window=max(1, min(WINDOW, first // MIN_WINDOWS)))[timed]
    report = with_pairs(report, {timed: pairs})
    for into, pl_times in ((values, pairs.compressed_ms), (dense, pairs.dense_ms)):
        into["latency_p50"], into["latency_p90"] = float(np.median(pl_times)), float(np.percentile(pl_times, 90))
    return PlanMeasurement(values, dense, pairs, judge(budgets, limits, values, pairs), report.to_json())


def preview_plans(model: str | os.PathLike, profiles: Sequence[str | Profile], budgets: dict[str, str] | None = None,
                  calib: CalibrationConfig = CalibrationConfig(num_sequences=32), reporter: Reporter = SILENT
                  ) -> list[Receipt]:
    """`edgesvd plan`: per-layer ranks of `model` for each profile's budgets, from whitened
    spectra on calibration data; nothing is trained or written. Infeasible budgets raise
    BudgetError with the smallest achievable size and latency."""
    chosen = load_profiles(profiles, budgets)  # every profile error before any work
    require_measurable(chosen)
    prepared = prepare(model, calib, reporter=reporter)
    pivoted = Whiten().pivoted(prepared.source.family)
    facts = model_facts(prepared.model, prepared.targets, prepared.source.family, pivoted)
    spectra = spectra_of(prepared.model, prepared.targets, "whiten", prepared.stats, reporter)
    layers, _ = whitened_importances(prepared.model, spectra, pivoted)
    return [plan_ranks(layers, cost_model_for(p, facts, reporter=reporter)) for p in chosen]
