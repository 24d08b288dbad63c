"""onnxruntime latency and memory of dense and compressed ONNX models side by side, with the FLOP bound."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
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
    paired: dict = field(default_factory=dict)  # mode → PairedLatency.to_json() where latency was paired

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


def weight_matmul_split(onnx_dir: str | os.PathLike, cfg: ProfileConfig, provider: str = CPU,
                        layers: Sequence[str] = ()) -> dict[str, float]:
    """Milliseconds per run of all kernels, of the weight MatMuls (the kernels factorization
    changes) and of those among them that belong to `layers` (Linear module names), from a
    node-level trace of a separate, untimed session; also the p50 and p90 of that worker's timed runs.
    What the FLOP bound leaves out shows here: kernels that factorization does not shrink."""
    prefixes = tuple("." + name + "." for name in layers)
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
    targeted = [n for n in weights if any(p in "." + n.replace("/", ".").strip(".") + "." for p in prefixes)]
    stats = next(iter(r["modes"].values()))
    return {"total_ms": sum(median.values()), "weight_matmul_ms": sum(median[n] for n in weights),
            "targeted_ms": sum(median[n] for n in targeted), "p50_ms": stats["p50_ms"], "p90_ms": stats["p90_ms"]}


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


# -- paired measurement and what it can claim ----------------------------------------------------
CONFIDENCE = 0.95  # every latency claim edgesvd makes holds at this confidence


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval; a bound is ±inf when too few samples pin it."""

    estimate: float
    low: float
    high: float
    level: float  # coverage of this interval alone

    @property
    def spread(self) -> float:
        """Width of the interval relative to the estimate (inf when a bound is open)."""
        return (self.high - self.low) / self.estimate if math.isfinite(self.high - self.low) else math.inf

    def to_json(self) -> dict:
        finite = lambda v: v if math.isfinite(v) else None
        return {"estimate": self.estimate, "low": finite(self.low), "high": finite(self.high), "level": self.level}

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def quantile_interval(values, q: float = 0.5, level: float = CONFIDENCE) -> Interval:
    """The q-quantile of `values` and a distribution-free confidence interval from order statistics.

    With B ~ Binomial(n, q) the number of samples below the true quantile, the sorted samples
    [x(l), x(u)] cover it with probability P(l <= B < u); l and u are the tightest ranks that keep
    each tail at most (1 - level) / 2. Chosen over the bootstrap because its coverage is exact for
    any distribution of independent samples (timings under load are skewed and bursty) at any n,
    and it is deterministic: the same timings always give the same receipt.
    """
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    if n == 0:
        raise ValueError("no samples")
    i = np.arange(n + 1)
    log_pmf = (math.lgamma(n + 1) - np.array([math.lgamma(k + 1) + math.lgamma(n - k + 1) for k in i])
               + i * math.log(q) + (n - i) * math.log1p(-q))
    cdf = np.cumsum(np.exp(log_pmf))  # cdf[k] = P(B <= k)
    tail = (1.0 - level) / 2
    lows = [l for l in range(1, n + 1) if cdf[l - 1] <= tail]  # 1-based rank l: P(B < l) <= tail
    highs = [u for u in range(1, n + 1) if 1.0 - cdf[u - 1] <= tail]  # P(B >= u) <= tail
    low = x[max(lows) - 1] if lows else -math.inf
    high = x[min(highs) - 1] if highs else math.inf
    return Interval(float(np.quantile(x, q)), float(low), float(high), level)


def latency_stats(times: list[float], items: int) -> dict:
    """p50/p90/p99/mean/min of a list of run times (ms) and the p50 throughput: the worker's rule."""
    from .profile_worker import stats

    return stats(times, items)


WINDOW = 10            # consecutive pairs summarised together (see PairedLatency)
MIN_WINDOWS = 24       # windows in a first look: enough for a finite bound on their WINDOW_QUANTILE
WINDOW_QUANTILE = 0.8  # a certified bound holds for this share of windows


@dataclass
class PairedLatency:
    """One mode of a paired measurement: dense and compressed times per pair (ms; index i of both
    lists is pair i, run back to back on the same inputs) and the 1-minute load average at each look.

    Load on a shared machine comes in spells of seconds to minutes that favour one model or the
    other, so consecutive pairs are not independent and a later measurement sees another spell
    (on this project's 2-core VM at load average 9, medians of 400-pair measurements of one
    bundle taken minutes apart ranged from 0.55 to 0.61). The pairs are therefore cut into windows
    of `window` consecutive pairs, each summarised on its own (the median of its per-pair ratios,
    or quantiles of its times), and two things are read from the windows:

    - interval(): the median over windows with its order-statistic confidence interval: where the
      typical window lies;
    - bound(): the upper confidence bound of the WINDOW_QUANTILE-th percentile of the windows: a
      value that at least that share of windows -- of measurements made the same way, now or by
      someone else -- stays under, at the interval's confidence. Budgets are certified on it.
    """

    mode: str
    dense_ms: list[float]
    compressed_ms: list[float]
    loads: list[float]
    level: float = CONFIDENCE  # coverage of each interval (per look, see paired_latency)
    looks: int = 1
    window: int = 1

    @property
    def pairs(self) -> int:
        return len(self.dense_ms)

    @property
    def load(self) -> float:
        """The highest 1-minute load average seen while measuring."""
        return max(self.loads) if self.loads else float("nan")

    def windows(self, what: str = "ratio", q: float = 0.5) -> np.ndarray:
        """Per window: 'ratio' = compressed ÷ dense (the median of the per-pair ratios for q = 0.5,
        else the ratio of the two q-quantiles), 'dense' / 'compressed' = the q-quantile of its times."""
        size = min(self.window, self.pairs)
        n = self.pairs // size
        d = np.asarray(self.dense_ms[:n * size]).reshape(n, size)
        c = np.asarray(self.compressed_ms[:n * size]).reshape(n, size)
        if what == "ratio":
            return np.median(c / d, axis=1) if q == 0.5 else np.quantile(c, q, axis=1) / np.quantile(d, q, axis=1)
        return np.quantile(d if what == "dense" else c, q, axis=1)

    def interval(self, what: str = "ratio", q: float = 0.5) -> Interval:
        """The median over windows and its confidence interval."""
        return quantile_interval(self.windows(what, q), 0.5, self.level)

    def bound(self, what: str = "ratio", q: float = 0.5) -> float:
        """Upper confidence bound of the WINDOW_QUANTILE-th percentile of the windows (inf when
        too few windows pin it)."""
        return quantile_interval(self.windows(what, q), WINDOW_QUANTILE, self.level).high

    def ratio(self) -> Interval:
        return self.interval("ratio")

    def compressed(self) -> Interval:
        return self.interval("compressed")

    def dense(self) -> Interval:
        return self.interval("dense")

    def to_json(self) -> dict:
        finite = lambda v: v if math.isfinite(v) else None
        return {"mode": self.mode, "pairs": self.pairs, "window": self.window, "looks": self.looks,
                "ratio_p50": {**self.ratio().to_json(), "bound": finite(self.bound())},
                "dense_p50_ms": self.dense().to_json(), "compressed_p50_ms": self.compressed().to_json(),
                "load_average": self.load, "confidence": CONFIDENCE, "window_quantile": WINDOW_QUANTILE,
                "method": f"per-pair ratios in windows of {self.window} consecutive pairs; median over windows with "
                          f"an order-statistic interval; bound = upper confidence bound of the "
                          f"{100 * WINDOW_QUANTILE:g}th percentile of the windows; {self.looks} look(s), each at "
                          f"{100 * self.level:.2f}% (Bonferroni)"}

    def summary(self) -> str:
        return (f"{self.mode} ratio {self.ratio()}, bound {self.bound():.3f} ({100 * CONFIDENCE:g}% confidence, "
                f"{self.pairs} pairs, load average {self.load:.2f})")


def with_pairs(report: ProfileReport, pairs: dict[str, PairedLatency]) -> ProfileReport:
    """`report` with the latency of the paired modes replaced by the paired measurement's (the
    numbers budgets are judged on) and the pairs' summary under `paired`."""
    items = {"prefill": report.config["batch"] * report.config["seq_len"]}
    for m in report.measurements:
        for mode, pl in pairs.items():
            times = pl.dense_ms if m.model == "dense" else pl.compressed_ms
            if mode in m.modes:
                m.modes[mode] = {**latency_stats(times, items.get(mode, report.config["batch"])), "paired": True}
    for c in report.comparisons:
        if c["mode"] in pairs:
            dense = next(m for m in report.measurements if m.model == "dense" and m.provider == c["provider"])
            comp = next(m for m in report.measurements if m.model == "compressed" and m.provider == c["provider"])
            c["dense_p50_ms"], c["compressed_p50_ms"] = dense.modes[c["mode"]]["p50_ms"], comp.modes[c["mode"]]["p50_ms"]
            c["speedup"] = c["dense_p50_ms"] / c["compressed_p50_ms"]
            c["fraction_of_bound"] = c["speedup"] * c["flop_ratio"]
    report.paired = {mode: pl.to_json() for mode, pl in pairs.items()}
    return report


class _PairWorker:
    """A profile_worker process serving paired timings of two models on request."""

    def __init__(self, spec: dict) -> None:
        self.where = spec["pair"][1]
        self.err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("profile_worker.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True)
        self.modes = self._ask(spec)["modes"]

    def _ask(self, message: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            result = json.loads(line) if line.strip() else None
        except (OSError, json.JSONDecodeError):
            result = None
        if result is None:
            self.err.seek(0)
            tail = (self.err.read().strip().splitlines() or ["no output"])[-1]
            raise ExportError(f"paired profiling of {self.where} failed: {tail[:300]}")
        if "error" in result:
            raise ExportError(f"paired profiling of {self.where} failed: {result['error']}")
        return result

    def more(self, pairs: int) -> dict:
        return self._ask({"pairs": pairs})

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"stop": True}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.err.close()


def pair_schedule(first: int, most: int) -> list[int]:
    """Total pairs after each look: `first`, doubling, ending at `most`."""
    sizes = [first]
    while sizes[-1] < most:
        sizes.append(min(2 * sizes[-1], most))
    return sizes


def paired_latency(dense_dir: str | os.PathLike, compressed_dir: str | os.PathLike, cfg: ProfileConfig,
                   provider: str = CPU, modes: tuple[str, ...] | None = None,
                   decided: Callable[[PairedLatency], bool] | None = None,
                   max_pairs: int | None = None, window: int = 1) -> dict[str, PairedLatency]:
    """Dense and compressed timed in one process, runs interleaved pair by pair after `cfg.warmup`
    warm-up pairs: the fair ratio on a machine shared with other work. {mode: PairedLatency}.

    Without `decided`: `cfg.runs` pairs. With it: `cfg.runs` pairs, then doubling up to `max_pairs`
    until `decided(first mode's PairedLatency)` is true. Looking again after each batch would
    raise the chance of a wrong claim, so each look's intervals have coverage
    1 - (1 - CONFIDENCE) / looks planned (Bonferroni): the sequence as a whole keeps CONFIDENCE.
    `window`: consecutive pairs summarised together (see PairedLatency).
    """
    d, c = Path(dense_dir) / MODEL_FILE, Path(compressed_dir) / MODEL_FILE
    sizes = pair_schedule(cfg.runs, max(max_pairs or cfg.runs, cfg.runs)) if decided else [cfg.runs]
    level = 1 - (1 - CONFIDENCE) / len(sizes)
    spec = {"path": str(c), "provider": provider, "batch": cfg.batch, "seq_len": cfg.seq_len, "warmup": cfg.warmup,
            "runs": cfg.runs, "session": cfg.session.to_json(), "pair": [str(d), str(c)],
            "modes": list(modes) if modes else None}
    worker = _PairWorker(spec)
    try:
        out = {m: PairedLatency(m, [], [], [], level, len(sizes), window) for m in worker.modes}
        for size in sizes:
            reply = worker.more(size - next(iter(out.values())).pairs)
            for mode, times in reply["times"].items():
                out[mode].dense_ms += times["dense"]
                out[mode].compressed_ms += times["compressed"]
                out[mode].loads.append(reply["load"])
            if decided is None or decided(out[worker.modes[0]]):
                break
    finally:
        worker.close()
    return out
