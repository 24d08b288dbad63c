"""onnxruntime latency and memory of dense and compressed ONNX models side by side, with the FLOP bound."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from edgesvd.checkpoint import read_record
from edgesvd.errors import ConfigError, ExportError
from edgesvd.inputs import read_json
from edgesvd.reporting import SILENT, Reporter

from .export import MODEL_FILE, ExportConfig, export_dense, onnx_files_bytes, read_export
from .graphcheck import GraphIndex, load_graph
from .providers import CPU, SessionConfig

_STATS = {"type": "object", "required": ["p50_ms", "p90_ms", "p99_ms", "throughput_per_s"],
          "properties": {k: {"type": "number"} for k in ("p50_ms", "p90_ms", "p99_ms", "throughput_per_s")}}
# The JSON of `profile --json` (ProfileReport.to_json) as `pack --profile-report` and a bundle's report read it back.
REPORT_SCHEMA: dict = {
    "type": "object", "required": ["config", "measurements", "comparisons"],
    "properties": {
        "config": {"type": "object", "required": ["batch", "seq_len", "runs", "warmup"],
                   "properties": {k: {"type": "integer"} for k in ("batch", "seq_len", "runs", "warmup")}},
        "measurements": {"type": "array", "items": {
            "type": "object", "required": ["model", "provider", "modes"],
            "properties": {"model": {"type": "string"}, "provider": {"type": "string"},
                           "onnx_bytes": {"type": ["integer", "null"]},
                           "modes": {"type": "object", "additionalProperties": _STATS}}}},
        "comparisons": {"type": "array", "items": {
            "type": "object", "required": ["provider", "mode", "speedup", "flop_bound_speedup"],
            "properties": {"provider": {"type": "string"}, "mode": {"type": "string"},
                           "speedup": {"type": "number"}, "flop_bound_speedup": {"type": "number"}}}},
    },
}


@dataclass(frozen=True)
class ProfileConfig:
    """Shapes and repetitions of the measurement, EPs (already resolved) and session options."""

    batch: int = 1
    seq_len: int = 128  # encoders: tokens per sequence; decoders: prompt length (prefill) and KV length (decode)
    warmup: int = 5
    runs: int = 50
    eps: tuple[str, ...] = (CPU,)
    session: SessionConfig = SessionConfig()
    per_node: bool = False

    def __post_init__(self) -> None:
        if self.batch < 1 or self.seq_len < 1:
            raise ConfigError("batch and sequence length must be >= 1")
        if self.runs < 1 or self.warmup < 0:
            raise ConfigError("need runs >= 1 and warmup >= 0")


@dataclass
class Measurement:
    """One model on one EP: session creation, peak memory and per-mode latency statistics."""

    model: str  # dense | compressed
    provider: str
    session_create_s: float
    peak_rss_mb: float
    modes: dict[str, dict]
    onnx_bytes: int
    per_layer_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class ProfileReport:
    config: dict
    measurements: list[Measurement]
    flops: dict[str, dict]  # model → {"linear_per_token", "attention_per_token", "total_per_token"}
    comparisons: list[dict]  # per EP and mode: p50 dense / compressed, and the FLOP bound

    def to_json(self) -> dict:
        return asdict(self)

    def p50(self, model: str, provider: str = CPU) -> dict[str, float]:
        return {mode: s["p50_ms"] for m in self.measurements if m.model == model and m.provider == provider
                for mode, s in m.modes.items()}


def _config_dims(onnx_dir: Path) -> tuple[int, int]:
    """(layers, hidden) from the config.json beside the graph, for attention FLOPs."""
    cfg = read_json(onnx_dir / "config.json", "model config", {"type": "object"}, error=ExportError)
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or 0
    heads, head_dim = cfg.get("num_attention_heads"), cfg.get("head_dim")
    if heads and head_dim:
        hidden = heads * head_dim
    return int(layers), int(hidden)


def graph_flops(onnx_dir: str | os.PathLike, context: int) -> dict[str, float]:
    """FLOPs per token: 2·k·n for every MatMul fed by a weight (k, n), plus attention scores and
    mixing at `context` tokens (4·context·hidden per layer, identical in dense and compressed)."""
    onnx_dir = Path(onnx_dir)
    graph = GraphIndex(load_graph(onnx_dir / MODEL_FILE, external_data=False))
    linear = 0.0
    for _norm, node, w in graph.weight_matmuls():
        dims = graph.weight_shape(node, w)
        if len(dims) == 2:
            linear += 2.0 * dims[0] * dims[1]
    layers, hidden = _config_dims(onnx_dir)
    attention = 4.0 * context * hidden * layers
    return {"linear_per_token": linear, "attention_per_token": attention, "total_per_token": linear + attention}


def _run_worker(path: Path, provider: str, cfg: ProfileConfig, profile_prefix: str | None,
                pair: tuple[Path, Path] | None = None) -> dict:
    spec = {"path": str(path), "provider": provider, "batch": cfg.batch, "seq_len": cfg.seq_len,
            "warmup": cfg.warmup, "runs": cfg.runs, "session": cfg.session.to_json(),
            "profile_prefix": profile_prefix, "pair": [str(p) for p in pair] if pair else None}
    # Run by path: importing it as a module would import edgesvd (and torch) into the worker, whose
    # memory must be the session's own.
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("profile_worker.py"))],
                          input=json.dumps(spec), capture_output=True, text=True)
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExportError(f"profiling {path} on {provider} failed: {tail[:300]}") from None
    if "error" in result:
        raise ExportError(f"profiling {path} on {provider} failed: {result['error']}")
    return result


_BLOCK = re.compile(r"(?:^|/)(layers?|h|block|blocks)\.(\d+)/")


def _node_events(trace_file: str | os.PathLike):
    """Kernel events (node name, event) of an onnxruntime trace, the untimed first run left out."""
    events = json.loads(Path(trace_file).read_text())
    model_runs = sorted(ev["ts"] for ev in events if ev.get("name") == "model_run")
    first_end = model_runs[1] if len(model_runs) > 1 else -1
    for ev in events:
        if ev.get("ts", 0) >= first_end and ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            yield ev["name"][: -len("_kernel_time")], ev


def aggregate_trace(trace_file: str | os.PathLike, runs: int) -> dict[str, float]:
    """Milliseconds per run for each transformer block (and 'other') from an onnxruntime trace
    that recorded one untimed first run followed by `runs` runs."""
    per_layer: dict[str, float] = defaultdict(float)
    for name, ev in _node_events(trace_file):
        m = _BLOCK.search(name)
        per_layer[f"{m.group(1)}.{m.group(2)}" if m else "other"] += ev.get("dur", 0) / 1000.0 / runs
    return dict(sorted(per_layer.items(), key=lambda kv: (kv[0] == "other", int(kv[0].split(".")[-1])
                                                           if kv[0] != "other" else 0)))


def weight_matmul_split(onnx_dir: str | os.PathLike, cfg: ProfileConfig, provider: str = CPU) -> dict[str, float]:
    """Milliseconds per run of all kernels and of the weight MatMuls (the kernels factorization
    changes), from a node-level trace of a separate, untimed session.
    What the FLOP bound leaves out shows here: kernels that factorization does not shrink."""
    with tempfile.TemporaryDirectory(prefix="edgesvd-split-") as tmp:
        r = _run_worker(Path(onnx_dir) / MODEL_FILE, provider, replace(cfg, warmup=1), str(Path(tmp) / "t"))
        durations: dict[str, list[float]] = defaultdict(list)
        weights = set()
        for name, ev in _node_events(r["node_profile"]):
            durations[name].append(ev.get("dur", 0) / 1000.0)
            # The trace lists a kernel's non-constant inputs only: a MatMul by a weight shows one.
            if ev.get("args", {}).get("op_name") == "MatMul" and len(ev["args"].get("input_type_shape", [])) == 1:
                weights.add(name)
    # Per node the median over runs: one preempted run on a shared machine does not move it.
    median = {name: float(np.median(d)) for name, d in durations.items()}
    return {"total_ms": sum(median.values()), "weight_matmul_ms": sum(median[n] for n in weights)}


def profile(compressed_dir: str | os.PathLike, dense_dir: str | os.PathLike | None = None,
            cfg: ProfileConfig = ProfileConfig()) -> ProfileReport:
    """Measure the compressed model (and the dense one, when given) on every EP in `cfg.eps`,
    each in its own process, and compare p50 latencies with the theoretical FLOP ratio."""
    models = {"compressed": Path(compressed_dir)}
    if dense_dir is not None:
        models = {"dense": Path(dense_dir), **models}
    for d in models.values():
        read_export(d)
    measurements, flops = [], {}
    family = read_export(models["compressed"])["family"]
    for label, d in models.items():
        flops[label] = graph_flops(d, cfg.seq_len)
    with tempfile.TemporaryDirectory(prefix="edgesvd-prof-") as tmp:
        for provider in cfg.eps:
            for label, d in models.items():
                prefix = str(Path(tmp) / f"{label}-{provider}") if cfg.per_node else None
                r = _run_worker(d / MODEL_FILE, provider, cfg, prefix)
                per_layer = aggregate_trace(r["node_profile"], r["profile_runs"]) if r.get("node_profile") else {}
                measurements.append(Measurement(label, r["provider"], r["session_create_s"], r["peak_rss_mb"],
                                                r["modes"], onnx_files_bytes(d), per_layer))
    comparisons = []
    if "dense" in models:
        f_ratio = flops["compressed"]["total_per_token"] / flops["dense"]["total_per_token"]
        lin_ratio = flops["compressed"]["linear_per_token"] / max(flops["dense"]["linear_per_token"], 1.0)
        for provider in cfg.eps:
            dense = next(m for m in measurements if m.model == "dense" and m.provider == provider)
            comp = next(m for m in measurements if m.model == "compressed" and m.provider == provider)
            for mode in comp.modes:
                # Decode attends to seq_len cached tokens, prefill/forward to seq_len tokens: same context.
                speedup = dense.modes[mode]["p50_ms"] / comp.modes[mode]["p50_ms"]
                comparisons.append({"provider": provider, "mode": mode, "dense_p50_ms": dense.modes[mode]["p50_ms"],
                                    "compressed_p50_ms": comp.modes[mode]["p50_ms"], "speedup": speedup,
                                    "flop_ratio": f_ratio, "linear_flop_ratio": lin_ratio,
                                    "flop_bound_speedup": 1.0 / f_ratio,
                                    "fraction_of_bound": speedup * f_ratio})
    config = {**asdict(cfg), "family": family}
    return ProfileReport(config, measurements, flops, comparisons)


def profile_against_dense(onnx_dir: str | os.PathLike, dense_dir: str | os.PathLike | None = None,
                          cfg: ProfileConfig = ProfileConfig(), with_dense: bool = True,
                          reporter: Reporter = SILENT) -> ProfileReport:
    """`edgesvd profile`: the export measured beside a dense baseline — `dense_dir`, or the
    checkpoint's source model exported now the same way (into a temporary folder) — or alone."""
    meta = read_export(onnx_dir)
    with tempfile.TemporaryDirectory(prefix="edgesvd-dense-") as tmp:
        if dense_dir is None and with_dense:
            _, record = read_record(meta["source"])
            reporter.info(f"exporting the dense baseline {record.source_model} …")
            dense_dir = export_dense(record.source_model, Path(tmp) / "dense", ExportConfig(**meta["config"])).out
        return profile(onnx_dir, dense_dir if with_dense else None, cfg)


def paired_latency(dense_dir: str | os.PathLike, compressed_dir: str | os.PathLike, cfg: ProfileConfig,
                   provider: str = CPU) -> dict[str, dict[str, dict]]:
    """Latency of dense and compressed measured in one process with interleaved runs: the fair
    ratio on a machine shared with other work. {"dense"|"compressed": {mode: statistics}}."""
    d, c = Path(dense_dir) / MODEL_FILE, Path(compressed_dir) / MODEL_FILE
    return _run_worker(c, provider, cfg, None, pair=(d, c))
