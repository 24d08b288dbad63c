"""Budgets on devices: the cost model of a profile, what an export measures against it, and plan previews."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from edgesvd.calibration import CalibrationConfig
from edgesvd.compression import prepare
from edgesvd.costmodel import CostModel, ModelFacts, model_facts
from edgesvd.errors import DeviceError
from edgesvd.factorize import LayerRecord, keep_of
from edgesvd.families import Family
from edgesvd.importance import whitened_importances
from edgesvd.planner import Receipt, plan_ranks
from edgesvd.profiles import Profile, load_profiles
from edgesvd.reporting import SILENT, Reporter
from edgesvd.spectra import spectra_of

from .export import ExportConfig, onnx_files_bytes
from .microbench import measure_layers
from .profiling import ProfileConfig, ProfileReport
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
    rank is timed under onnxruntime (cached); elsewhere it is calibrated or estimated."""
    table = None
    if measure and is_local(profile):
        rt = profile.runtime
        table = measure_layers(list(facts.layers), profile.workload.tokens(facts.family), profile.rank_multiple,
                               rt.execution_provider, rt.threads, rt.precision, reporter=reporter)
    return CostModel(profile, facts, table)


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
    return keep_of([LayerRecord(r.name, r.shape[1], r.shape[0], r.rank, False) for r in receipt.rows])


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


def measure_export(onnx_dir: Path, profile: Profile, family: Family, runs: int, warmup: int, session: SessionConfig,
                   dense_dir: Path | None = None) -> tuple[dict, dict | None, dict]:
    """Latency, peak memory and size of one export on this machine at the profile's workload, and
    of the dense export too when `dense_dir` is given: measured back to back, so a relative budget
    compares two numbers taken under the same load. Returns (values, dense values or None, report)."""
    w = profile.workload
    report = profile_onnx(onnx_dir, dense_dir, ProfileConfig(batch=w.batch, seq_len=w.seq_len(family), warmup=warmup,
                                                        runs=runs, eps=(profile.runtime.execution_provider,),
                                                        session=session))
    dense = _values(report, "dense", dense_dir) if dense_dir is not None else None
    return _values(report, "compressed", onnx_dir), dense, report.to_json()


def preview_plans(model: str | os.PathLike, profiles: Sequence[str | Profile], budgets: dict[str, str] | None = None,
                  calib: CalibrationConfig = CalibrationConfig(num_sequences=32), reporter: Reporter = SILENT
                  ) -> list[Receipt]:
    """`edgesvd plan`: per-layer ranks of `model` for each profile's budgets, from whitened
    spectra on calibration data; nothing is trained or written. Infeasible budgets raise
    BudgetError with the smallest achievable size and latency."""
    chosen = load_profiles(profiles, budgets)  # every profile error before any work
    require_measurable(chosen)
    prepared = prepare(model, calib, reporter=reporter)
    facts = model_facts(prepared.model, prepared.targets, prepared.source.family)
    spectra = spectra_of(prepared.model, prepared.targets, "whiten", prepared.stats, reporter)
    layers, _ = whitened_importances(prepared.model, spectra)
    return [plan_ranks(layers, cost_model_for(p, facts, reporter=reporter)) for p in chosen]
