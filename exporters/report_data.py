"""Read a bundle (manifest.json, reports/, config.json, spectrum) into the plain inputs of its HTML report."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgesvd.checkpoint import check_section, check_spectrum_shapes
from edgesvd.errors import InputFileError, first_line
from edgesvd.families import FAMILIES
from edgesvd.inputs import read_json
from edgesvd.inspect import LayerRow
from edgesvd.profiles import BUDGET_LABELS
from edgesvd.units import BYTES_PER_PARAM

from .manifest import read_manifest
from .profiling import REPORT_SCHEMA as PROFILE_SCHEMA

SPECTRUM_FILE = "reports/spectrum.safetensors"
# How many layers the spectrum chart shows (one per distinct shape first, then the last layer).
SPECTRUM_LAYERS = 4


@dataclass(frozen=True)
class SpectrumRow:
    """A layer's singular values (descending), learned scores (None when the method learned none)
    and which components the compressed layer keeps."""

    name: str
    sigma: np.ndarray
    kept: np.ndarray  # bool, same length as sigma
    scores: np.ndarray | None


@dataclass(frozen=True)
class LatencyRow:
    """One model on one execution provider and mode; `source` says measured or estimated."""

    provider: str
    mode: str
    model: str  # dense | compressed
    p50_ms: float
    p90_ms: float | None
    p99_ms: float | None
    source: str  # 'measured', or 'estimated (…)' saying where the estimate comes from


@dataclass(frozen=True)
class BudgetRow:
    """One budget of the device profile: the limit, the planned value and the measured one."""

    key: str
    budget: str  # as written in the profile: '60% of dense', '40 MB'
    limit: float
    planned: float | None
    measured: float | None
    binding: bool = False

    @property
    def unit(self) -> str:
        return "ms" if self.key.startswith("latency") else "bytes"

    @property
    def label(self) -> str:
        return BUDGET_LABELS.get(self.key, self.key.replace("_", " "))

    @property
    def verdict(self) -> str:
        """pass / fail on the measured value; 'estimated pass/fail' when the device was not at hand."""
        if self.measured is None:
            if self.planned is None:
                return "not measured"
            return "estimated pass" if self.planned <= self.limit else "estimated fail"
        return "pass" if self.measured <= self.limit else "fail"


@dataclass(frozen=True)
class ParityRow:
    provider: str
    status: str  # passed | failed | skipped
    detail: str


@dataclass(frozen=True)
class QualityRow:
    """A quality metric that was computed (parity cosine, task score); `kind` says against what."""

    metric: str
    value: float
    kind: str  # e.g. 'parity: ONNX vs compressed PyTorch', 'task score'
    detail: str = ""


@dataclass(frozen=True)
class ParetoPoint:
    """One variant (a keep, a device, or a baseline users have without edgesvd) for the quality /
    latency / size trade-off chart."""

    label: str
    bytes: float
    latency_ms: float | None
    latency_source: str  # measured | estimated
    quality: float
    quality_name: str
    kind: str = "edgesvd"  # edgesvd | baseline
    latencies: dict[str, float] = field(default_factory=dict)  # p50 per measured shape ('b1', 'b8', 'prefill', …)


@dataclass
class ReportInputs:
    """Everything the report shows, extracted from one bundle; None / empty means the bundle lacks it."""

    bundle: Path
    model: str
    family: str
    model_type: str
    precision: str
    opset: int | None
    method: str
    keep_requested: float | None
    keep_actual: float | None
    created: str
    onnx_bytes: int | None
    dense_onnx_bytes: int | None
    profile: str | None  # device profile name
    device: str = ""  # device · execution provider · precision · workload
    budgets: list[BudgetRow] = field(default_factory=list)
    budget_notes: list[str] = field(default_factory=list)
    parity_ok: bool | None = None
    parity: list[ParityRow] = field(default_factory=list)
    layers: list[LayerRow] = field(default_factory=list)
    spectra: list[SpectrumRow] = field(default_factory=list)
    latency: list[LatencyRow] = field(default_factory=list)
    latency_shape: dict = field(default_factory=dict)
    comparisons: list[dict] = field(default_factory=list)
    quality: list[QualityRow] = field(default_factory=list)
    pareto: list[ParetoPoint] = field(default_factory=list)
    pareto_note: str = ""  # why fewer than two comparable points exist
    pareto_verdict: list[str] = field(default_factory=list)  # who dominates whom (run --compare-quantized)
    pareto_source: str = ""  # how the points' scores and latencies were measured
    importance_kept: float | None = None  # planner's share of importance kept (a quality proxy)
    versions: dict = field(default_factory=dict)


def _read_json(path: Path, what: str, schema: dict | None = None):
    """A JSON file of the bundle, validated when a schema is given; None when absent."""
    return read_json(path, what, schema) if os.path.lexists(path) else None


def _layers(bundle: Path, manifest: dict, bytes_per_param: int):
    """Shapes come from the edgesvd section of the bundle's config.json (validated as a checkpoint's
    is); ranks from the manifest. Also returns the parsed section (None without one)."""
    config = _read_json(bundle / "config.json", "bundle config", {"type": "object"}) or {}
    if "edgesvd" not in config:
        return [], None
    record = check_section(config["edgesvd"], f"'edgesvd' section of {bundle / 'config.json'}", InputFileError)
    ranks = manifest["compression"].get("ranks", {})
    rows = [LayerRow(layer.name, layer.out_features, layer.in_features, ranks.get(layer.name, layer.rank),
                     bytes_per_param, pivoted=layer.pivoted) for layer in record.layers]
    return rows, record


def _spectra(bundle: Path, layers: list[LayerRow], record) -> list[SpectrumRow]:
    """A few layers' spectra: the first layer of every distinct shape, then the last targeted layer."""
    path = bundle / SPECTRUM_FILE
    if not path.is_file() or record is None:
        return []
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # SafetensorError: truncated or not a safetensors file
        raise InputFileError(f"corrupt {path}: {first_line(exc)}") from None
    check_spectrum_shapes({k: a.shape for k, a in tensors.items()}, record, str(path), InputFileError)
    entries: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        layer, _, entry = key.rpartition(".")
        entries.setdefault(layer, {})[entry] = arr
    chosen, shapes = [], set()
    for row in layers:
        if row.name in entries and (row.out_features, row.in_features) not in shapes:
            shapes.add((row.out_features, row.in_features))
            chosen.append(row.name)
    last = next((r.name for r in reversed(layers) if r.name in entries), None)
    if last and last not in chosen:
        chosen.append(last)
    out = []
    for name in chosen[:SPECTRUM_LAYERS]:
        e = entries[name]
        sigma = e["sigma"].astype(np.float64)
        kept = e["kept"].astype(bool) if "kept" in e else np.ones_like(sigma, dtype=bool)
        scores = e["scores"].astype(np.float64) if "scores" in e else None
        out.append(SpectrumRow(name, sigma, kept, scores))
    return out


def _parity(manifest: dict) -> tuple[bool | None, list[ParityRow], list[QualityRow]]:
    parity = manifest.get("parity")
    if not parity:
        return None, [], []
    rows, quality = [], []
    for provider, r in parity.get("providers", {}).items():
        metrics = [f"{k.replace('_', ' ')} {r[k]:.6f}" for k in ("embedding_cosine", "top1", "generation")
                   if r.get(k) is not None]
        if r.get("min_cosine") is not None:
            metrics.insert(0, f"min output cosine {r['min_cosine']:.6f}")
        detail = r.get("reason") or "; ".join(r.get("failures") or []) or ", ".join(metrics)
        rows.append(ParityRow(provider, r.get("status", "unknown"), detail))
        short = provider.replace("ExecutionProvider", "")
        kind = f"parity: ONNX ({parity.get('precision', '?')}) vs compressed PyTorch on {short}"
        for key, name in (("min_cosine", "worst output cosine"), ("embedding_cosine", "worst embedding cosine"),
                          ("top1", "top-1 token agreement"), ("generation", "greedy generation match")):
            if r.get(key) is not None:
                quality.append(QualityRow(name, float(r[key]), kind))
    return bool(parity.get("ok")), rows, quality


def _latency(manifest: dict, profile: dict | None) -> tuple[list[LatencyRow], dict, list[dict], dict[str, int]]:
    """Measured rows from reports/profile.json (or the manifest's summary of it), and ONNX bytes per model."""
    rows, onnx_bytes = [], {}
    if profile:
        shape = {k: profile.get("config", {}).get(k) for k in ("batch", "seq_len", "runs", "warmup")}
        for m in profile.get("measurements", []):
            onnx_bytes[m["model"]] = m.get("onnx_bytes")
            for mode, s in m.get("modes", {}).items():
                rows.append(LatencyRow(m["provider"], mode, m["model"], s["p50_ms"], s.get("p90_ms"),
                                       s.get("p99_ms"), "measured"))
        return rows, shape, profile.get("comparisons", []), onnx_bytes
    lat = manifest.get("latency")
    if not lat:
        return [], {}, [], {}
    for model, providers in lat.get("models", {}).items():
        for provider, modes in providers.items():
            for mode, s in modes.items():
                rows.append(LatencyRow(provider, mode, model, s["p50_ms"], s.get("p90_ms"), s.get("p99_ms"),
                                       "measured"))
    return rows, lat.get("shape", {}), lat.get("comparisons", []), {}


def _budget_info(manifest: dict) -> dict:
    """The manifest's `budgets` section written by `edgesvd run --profile` ({} when packed without one):
    profile, device, execution_provider, workload, values (+ values_are), dense, plans, quality_proxy, receipt."""
    info = manifest.get("budgets")
    return info if isinstance(info, dict) and isinstance(info.get("receipt"), dict) else {}


def _measured_here(info: dict) -> bool:
    return str(info.get("values_are", "")).startswith("measured")


def _budgets(info: dict) -> tuple[list[BudgetRow], list[str]]:
    """Budget rows from the receipt; measured values are taken only where the run measured them."""
    if not info:
        return [], []
    receipt, values = info["receipt"], info.get("values") or {}
    rows = []
    for b in receipt.get("budgets", []):
        measured = b.get("measured")
        if measured is None and _measured_here(info):
            measured = values.get(b["key"])
        rows.append(BudgetRow(b["key"], str(b.get("budget", "")), float(b["limit"]),
                              None if b.get("value") is None else float(b["value"]),
                              None if measured is None else float(measured), bool(b.get("binding"))))
    notes = [f"Values are {info['values_are']}." if info.get("values_are") else ""]
    for plan in info.get("plans") or []:
        if plan.get("missed"):
            notes.append(f"Plan {plan['plan']} missed on this machine ({plan['missed']}); the budget was tightened "
                         "and the ranks planned again.")
    notes += list(receipt.get("notes", []))
    return rows, [n for n in notes if n]


def _device(info: dict, family: str) -> str:
    """Device · execution provider · precision · the workload that applies to this model family."""
    if not info:
        return ""
    w = dict(info.get("workload") or {})
    if family in FAMILIES and not FAMILIES[family].causal:  # prompt and generation lengths describe decoders only
        w.pop("prompt_length", None)
        w.pop("new_tokens", None)
    shape = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in w.items() if v not in (None, 0))
    parts = [info.get("device"), info.get("execution_provider"), info.get("precision"), shape]
    return " · ".join(str(p) for p in parts if p)


def _budget_latency(info: dict, measured: list[LatencyRow]) -> list[LatencyRow]:
    """The dense model's latency measured by the budget run, and the planner's whole-model estimate
    of dense and compressed (a sum of per-layer costs: an estimate even when those costs were timed)."""
    if not info:
        return []
    receipt, out = info["receipt"], []
    provider = info.get("execution_provider") or "planner"
    mode = next((r.mode for r in measured if r.provider == provider), "forward")
    dense = info.get("dense") or {}
    if _measured_here(info) and dense.get("latency_p50") is not None and not any(r.model == "dense" for r in measured):
        out.append(LatencyRow(provider, mode, "dense", float(dense["latency_p50"]),
                              None if dense.get("latency_p90") is None else float(dense["latency_p90"]), None,
                              "measured"))
    source = f"estimated (planner, {receipt.get('latency_source', '?')} layer costs)"
    for model, values in (("dense", receipt.get("dense", {})), ("compressed", receipt.get("totals", {}))):
        if values.get("latency_p50") is not None:
            p90 = values.get("latency_p90")
            out.append(LatencyRow(provider, mode, model, float(values["latency_p50"]),
                                  None if p90 is None else float(p90), None, source))
    return out


def _proxy_quality(info: dict) -> list[QualityRow]:
    return [QualityRow(k.replace("_", " "), float(v), "quality proxy: compressed vs dense PyTorch",
                       "held-out calibration text") for k, v in (info.get("quality_proxy") or {}).items()]


def _task_quality(manifest: dict) -> list[QualityRow]:
    """Task scores the bundle recorded (e.g. STS-B Spearman), dense beside compressed when both exist."""
    out = []
    for name, q in (manifest.get("quality") or {}).items():
        if isinstance(q, dict):
            for variant in ("dense", "compressed"):
                if q.get(variant) is not None:
                    out.append(QualityRow(f"{name} ({variant})", float(q[variant]), "task score",
                                          str(q.get("dataset", ""))))
        elif isinstance(q, (int, float)):
            out.append(QualityRow(name, float(q), "task score"))
    return out


COMPARISON = "comparison.json"


def _run_comparison(bundle: Path) -> list[ParetoPoint]:
    """Points of every device of an `edgesvd run --profile A --profile B` (its comparison.json sits
    two folders up: OUT/<model>/comparison.json beside OUT/<model>/<profile>/bundle)."""
    entries = _read_json(bundle.resolve().parent.parent / COMPARISON, "run comparison",
                         {"type": "array", "items": {"type": "object"}})
    if not entries:
        return []
    points = []
    for e in entries:
        quality = next(iter((e.get("quality") or {}).items()), None)
        if quality is None or e.get("onnx_bytes") is None:
            continue
        lat = (e.get("values") or {}).get("latency_p50")
        points.append(ParetoPoint(str(e.get("profile")), float(e["onnx_bytes"]), None if lat is None else float(lat),
                                  "measured" if e.get("measured") else "estimated", float(quality[1]),
                                  quality[0].replace("_", " ")))
    return points if len({p.quality_name for p in points}) == 1 else []


def _baseline_points(manifest: dict) -> tuple[list[ParetoPoint], list[str], str]:
    """Points of `run --compare-quantized` (the manifest's `baselines`): the dense model through
    onnxruntime's optimizer and quantization beside edgesvd's variants, all measured together."""
    c = manifest.get("baselines")
    if not isinstance(c, dict) or not c.get("points"):
        return [], [], ""
    name = str(c.get("score_name", "score")).replace("_", " ")
    first = (c.get("shapes") or [None])[0]
    points = [ParetoPoint(p["label"], float(p["onnx_bytes"]), p["latency_ms"].get(first), "measured",
                          float(p["score"]), name, p.get("kind", "edgesvd"),
                          {k: float(v) for k, v in p["latency_ms"].items()}) for p in c["points"]]
    source = (f"Score: {c.get('score_source', '?')}. Latency: p50 of {c.get('runs')} rounds, every model once "
              f"per round in rotating order in one process ({c.get('clock')} clock, session "
              f"{c.get('session')}); load average {c.get('load_average')}. Dominance: no larger, faster at every "
              f"shape, score within {c.get('tolerance')}.")
    return points, list(c.get("verdict") or []), source


def variant_point(r: ReportInputs) -> ParetoPoint | None:
    """This bundle as one point of a trade-off chart: its task score (else the planner's importance
    kept, a proxy), its p50 latency (measured when there is one) and its ONNX bytes."""
    task = next((q for q in r.quality if q.kind == "task score" and not q.metric.endswith("(dense)")), None)
    proxy = next((q for q in r.quality if q.kind.startswith("quality proxy")), None)
    if task is not None:
        quality, name = task.value, task.metric.removesuffix(" (compressed)")
    elif proxy is not None:
        quality, name = proxy.value, proxy.metric
    elif r.importance_kept is not None:
        quality, name = r.importance_kept, "importance kept (proxy)"
    else:
        return None
    comp = [x for x in r.latency if x.model == "compressed"]
    lat = next((x for x in comp if x.source == "measured"), comp[0] if comp else None)
    lat_source = "measured" if lat is None or lat.source == "measured" else "estimated"
    label = " ".join(p for p in (r.profile, f"keep {r.keep_actual:.2f}" if r.keep_actual is not None else "") if p)
    return ParetoPoint(label or r.bundle.name, float(r.onnx_bytes or 0), None if lat is None else lat.p50_ms,
                       lat_source, quality, name)


def _compare_points(inputs: ReportInputs, others: list[ReportInputs]) -> tuple[list[ParetoPoint], str]:
    points, missing = [], []
    for r in [inputs, *others]:
        point = variant_point(r)
        if point is None:
            missing.append(r.bundle.name)
        else:
            points.append(point)
    if missing:
        return [], (f"{', '.join(missing)} record(s) no quality against the dense model (no task score, no "
                    "budget run), so the variants cannot be placed on a quality axis.")
    if len({p.quality_name for p in points}) > 1:
        return [], "the bundles measure quality differently (" + ", ".join(sorted({p.quality_name for p in points})) + ")."
    return points, ""


def read_bundle(bundle: str | os.PathLike, compare: tuple[str | os.PathLike, ...] = ()) -> ReportInputs:
    """Extract the report's inputs from a bundle folder; `compare`: other bundles (other keeps or
    devices) for the trade-off chart. BundleError when a folder has no manifest."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise InputFileError(f"bundle does not exist: {bundle}" if not os.path.lexists(bundle)
                             else f"bundle {bundle} is not a folder (the report is written into a bundle folder)")
    manifest = read_manifest(bundle)
    model, comp = manifest["model"], manifest["compression"]
    precision = model.get("precision", "fp32")
    layers, record = _layers(bundle, manifest, BYTES_PER_PARAM.get(precision, 4))
    profile = _read_json(bundle / "reports" / "profile.json", "profile report", PROFILE_SCHEMA)
    latency, shape, comparisons, onnx_bytes = _latency(manifest, profile)
    info = _budget_info(manifest)
    latency += _budget_latency(info, latency)
    budgets, notes = _budgets(info)
    dense_bytes = onnx_bytes.get("dense")
    if dense_bytes is None and _measured_here(info):
        dense_bytes = (info.get("dense") or {}).get("model_bytes")
    parity_ok, parity_rows, parity_quality = _parity(manifest)
    inputs = ReportInputs(
        bundle=bundle, model=manifest.get("source", {}).get("model", bundle.name),
        family=model.get("family", "?"), model_type=model.get("model_type", "?"), precision=precision,
        opset=model.get("opset"), method=comp.get("method", "?"), keep_requested=comp.get("keep_requested"),
        keep_actual=comp.get("keep_actual"), created=manifest.get("created", ""),
        onnx_bytes=manifest.get("onnx_bytes"), dense_onnx_bytes=dense_bytes,
        profile=info.get("profile"), device=_device(info, model.get("family", "")), budgets=budgets, budget_notes=notes, parity_ok=parity_ok,
        parity=parity_rows, layers=layers, spectra=_spectra(bundle, layers, record), latency=latency, latency_shape=shape,
        comparisons=comparisons, quality=parity_quality + _proxy_quality(info) + _task_quality(manifest),
        pareto=_run_comparison(bundle), importance_kept=info.get("receipt", {}).get("importance_kept"), versions=manifest.get("versions", {}))
    baseline_points, inputs.pareto_verdict, inputs.pareto_source = _baseline_points(manifest)
    if baseline_points:
        inputs.pareto = baseline_points
    if compare:
        inputs.pareto, inputs.pareto_note = _compare_points(inputs, [read_bundle(c) for c in compare])
        inputs.pareto_verdict, inputs.pareto_source = [], ""
    return inputs
