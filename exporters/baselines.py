"""What users already have beside edgesvd — onnxruntime's optimizer, int8 and 4-bit on the dense model — measured with edgesvd's own variants: size, quality, interleaved latency, who dominates whom."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from edgesvd.checkpoint import CompressionRecord, read_record
from edgesvd.errors import ConfigError, ExportError
from edgesvd.evaluate import spearman
from edgesvd.families import Family
from edgesvd.reporting import SILENT, Reporter

from .export import (
    MODEL_FILE,
    ExportConfig,
    export_checkpoint,
    export_model,
    onnx_files_bytes,
    quantize_refusal,
    read_export,
)
from .onnx_scores import mean_pool, task_score_onnx
from .providers import CPU, SessionConfig, create_session

BASELINE, EDGESVD = "baseline", "edgesvd"
CLOCKS = ("wall", "cpu")
# Dominance: a point dominates another when it is no larger on disk, faster at every measured
# shape (median of the paired per-round ratios), and its score is within this tolerance — an
# absolute difference for agreement-type scores (STS-B Spearman, proxies), a relative one for
# perplexity.
SCORE_TOLERANCE = 0.005
PERPLEXITY_TOLERANCE = 0.01
# Bootstrap resamples of the rounds for the confidence interval of a median paired ratio.
BOOTSTRAP = 1000


@dataclass(frozen=True)
class CompareConfig:
    """How `run --compare-quantized` measures: interleaved rounds per shape, encoder batch sizes,
    sequence length (decoders: prompt and KV-cache length), clock, session options.

    clock "wall" is what a user's application sees; "cpu" (one intra-op thread, the calling
    thread's CPU time) is the clock that stays stable on a machine shared with other work."""

    runs: int = 30
    warmup: int = 3
    batches: tuple[int, ...] = (1, 8)
    seq_len: int = 128
    clock: str = "wall"
    session: SessionConfig = SessionConfig()
    keep_variants: bool = False  # keep every variant's ONNX folder (they can be large)

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise ConfigError(f"unknown clock '{self.clock}' (choose from {', '.join(CLOCKS)})")
        if self.runs < 3 or self.warmup < 0 or not self.batches or min(self.batches) < 1:
            raise ConfigError("the comparison needs runs >= 3, warmup >= 0 and batch sizes >= 1")

    def session_for_clock(self) -> SessionConfig:
        return replace(self.session, intra_op_threads=1) if self.clock == "cpu" else self.session


@dataclass(frozen=True)
class Variant:
    """One model of the comparison: an ONNX folder, how it was made, and whose it is."""

    label: str
    kind: str  # baseline | edgesvd
    precision: str
    fusions: tuple[str, ...]
    onnx_dir: Path


@dataclass
class Point:
    """One variant measured: bytes on disk, score, p50 per shape, speedup over the dense model per
    shape (median of paired per-round ratios and its bootstrap 95 % interval), dominance."""

    label: str
    kind: str
    precision: str
    fusions: list[str]
    onnx_bytes: int
    score: float
    latency_ms: dict[str, float]
    speedup: dict[str, list[float]]  # shape → [median, low, high]
    dominates: list[str] = field(default_factory=list)
    dominated_by: list[str] = field(default_factory=list)


@dataclass
class Comparison:
    """Every point, how they were measured and the verdict lines the report and CLI print."""

    points: list[Point]
    score_name: str
    score_source: str  # 'task score on FILE' | 'proxy: … on held-out calibration text'
    higher_is_better: bool
    tolerance: str
    shapes: list[str]
    clock: str
    session: dict
    runs: int
    load_average: list[float]
    verdict: list[str]

    def to_json(self) -> dict:
        return asdict(self)


def _dense_specs(family: Family) -> list[tuple[str, ExportConfig]]:
    """The dense baselines users have one command away, for `family`."""
    if family.causal:
        return [("dense", ExportConfig()), ("dense int8", ExportConfig(quantize="int8")),
                ("dense int4", ExportConfig(quantize="int4"))]
    pooled = family.pooled_output
    return [("dense", ExportConfig(pooled=pooled)), ("dense + ort-opt", ExportConfig(pooled=pooled, fuse=("ort",))),
            ("dense int8", ExportConfig(pooled=pooled, quantize="int8")),
            ("dense + ort-opt + int8", ExportConfig(pooled=pooled, fuse=("ort",), quantize="int8"))]


def _exported_as(where: Path, cfg: ExportConfig, source: Path | None = None) -> bool:
    """Whether `where` holds an export with `cfg` made after `source` (a checkpoint folder) was
    last written: a checkpoint rebuilt under the same name must not reuse the old export."""
    try:
        same = ExportConfig(**read_export(where)["config"]) == cfg
        return same and (source is None or (where / MODEL_FILE).stat().st_mtime >= source.stat().st_mtime)
    except (ExportError, TypeError, ConfigError, OSError):
        return False


def edgesvd_precisions(family: Family, record: CompressionRecord | None = None) -> tuple[str | None, ...]:
    """The precisions edgesvd's model is compared at: fp32 and int8, plus int4 for decoders, less
    those its factor forms do not survive (exporters/quantize.py)."""
    wanted = (None, "int8", "int4") if family.causal else (None, "int8")
    return tuple(q for q in wanted if not quantize_refusal(q, record))


def baseline_variants(dense_model, tokenizer, family: Family, source: str, folder: Path,
                      reporter: Reporter = SILENT, reuse: bool = False) -> list[Variant]:
    """Export the dense baselines from the dense model into `folder`/dense-<n>; the first is the
    dense fp32 model, the reference of every ratio. `reuse`: keep a variant already exported
    there with the same export configuration (benchmarks that run again)."""
    variants = []
    for i, (label, cfg) in enumerate(_dense_specs(family)):
        reporter.step(f"comparison: exporting {label}")
        where = folder / f"dense-{i}"
        if not (reuse and _exported_as(where, cfg)):
            export_model(dense_model, tokenizer, family, where, cfg, None, source, force=True)
        variants.append(Variant(label, BASELINE, cfg.precision, cfg.fuse, where))
    return variants


def edgesvd_variants(checkpoint: Path, name: str, family: Family, folder: Path, fuse: tuple[str, ...] = (),
                     reporter: Reporter = SILENT, precisions: tuple[str | None, ...] | None = None,
                     reuse: bool = False) -> list[Variant]:
    """Export a compressed checkpoint at each compared precision (or `precisions`; None is fp32),
    with `fuse`, into `folder`/<name>-<fusions>-<n>."""
    variants = []
    fuse = ExportConfig(fuse=fuse).fuse
    suffix = " + " + "+".join(fuse) if fuse else ""
    for i, q in enumerate(precisions or edgesvd_precisions(family, read_record(checkpoint)[1])):
        cfg = ExportConfig(pooled=family.pooled_output, quantize=q, fuse=fuse)
        label = f"{name} {cfg.precision}{suffix}"
        reporter.step(f"comparison: exporting {label}")
        where = folder / f"{name.replace(' ', '-')}-{'+'.join(fuse) or 'plain'}-{i}"
        if not (reuse and _exported_as(where, cfg, Path(checkpoint) / "config.json")):
            export_checkpoint(checkpoint, where, cfg, force=True)
        variants.append(Variant(label, EDGESVD, cfg.precision, cfg.fuse, where))
    return variants


# -- quality ------------------------------------------------------------------------------------
def _proxy_outputs(onnx_dir: Path, held_out, family: Family, session: SessionConfig) -> np.ndarray:
    """Encoders: mean-pooled embeddings of the held-out sequences; decoders: next-token argmax."""
    sess = create_session(onnx_dir / MODEL_FILE, session, CPU)
    names = {i.name for i in sess.get_inputs()}
    ids, mask = held_out.input_ids.numpy().astype(np.int64), held_out.attention_mask.numpy().astype(np.int64)
    outs = []
    for start in range(0, len(ids), 8):
        feed = {"input_ids": ids[start:start + 8], "attention_mask": mask[start:start + 8]}
        n, t = feed["input_ids"].shape
        for inp in sess.get_inputs():
            if inp.name == "token_type_ids":
                feed[inp.name] = np.zeros_like(feed["input_ids"])
            elif inp.name == "position_ids":
                feed[inp.name] = np.tile(np.arange(t, dtype=np.int64), (n, 1))
            elif inp.name.startswith("past_key_values"):
                feed[inp.name] = np.zeros((n, inp.shape[1], 0, inp.shape[3]), np.float32)
        if family.causal:
            outs.append(sess.run(["logits"], {k: v for k, v in feed.items() if k in names})[0].argmax(-1))
        else:
            hidden = sess.run(["last_hidden_state"], {k: v for k, v in feed.items() if k in names})[0]
            outs.append(mean_pool(hidden, feed["attention_mask"]))
    return np.concatenate(outs)


def _proxy_score(ref: np.ndarray, got: np.ndarray, held_out, family: Family) -> float:
    """The family's quality proxy of `got` against the dense model's `ref` (as
    edgesvd.evaluate.agreement_with_dense computes it in PyTorch)."""
    if family.causal:
        mask = held_out.attention_mask.numpy().astype(bool)
        return round(float((ref == got)[mask].mean()), 4)

    def similarities(e):
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        iu = np.triu_indices(len(e), 1)
        return (e @ e.T)[iu]

    return round(spearman(similarities(ref), similarities(got)), 4)


def score_variants(variants: list[Variant], family: Family, eval_file: Path | None, held_out,
                   session: SessionConfig, reporter: Reporter = SILENT) -> tuple[str, str, dict[str, float]]:
    """(score name, what it is, score per label): the task score on `eval_file` through
    onnxruntime when given, else the family's proxy against the dense fp32 variant on held-out
    calibration text."""
    if eval_file is not None:
        scores = {}
        for v in variants:
            reporter.step(f"comparison: scoring {v.label} on {Path(eval_file).name}")
            scores[v.label] = task_score_onnx(v.onnx_dir, eval_file, family, session)[1]
        return family.task_score, f"task score on {Path(eval_file).resolve()}", scores
    reporter.step("comparison: agreement with the dense model on held-out calibration text")
    ref = _proxy_outputs(variants[0].onnx_dir, held_out, family, session)
    scores = {v.label: _proxy_score(ref, _proxy_outputs(v.onnx_dir, held_out, family, session), held_out, family)
              for v in variants}
    return family.quality_proxy, "proxy: agreement with the dense fp32 ONNX model on held-out calibration text", scores


# -- latency ------------------------------------------------------------------------------------
def interleaved_latency(dirs: list[Path], cfg: CompareConfig) -> dict:
    """Every model's per-round times for every shape, all models in one worker process with their
    runs interleaved (profile_worker.measure_many)."""
    spec = {"models": [str(d / MODEL_FILE) for d in dirs], "provider": CPU, "batches": list(cfg.batches),
            "seq_len": cfg.seq_len, "warmup": cfg.warmup, "runs": cfg.runs, "clock": cfg.clock,
            "session": cfg.session_for_clock().to_json()}
    worker = Path(__file__).with_name("profile_worker.py")
    proc = subprocess.run([sys.executable, str(worker)], input=json.dumps(spec), capture_output=True, text=True)
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExportError(f"the interleaved latency measurement failed: {tail[:300]}") from None
    if "error" in result:
        raise ExportError(f"the interleaved latency measurement failed: {result['error']}")
    return result


def paired_speedup(reference: list[float], times: list[float], seed: int = 0) -> list[float]:
    """[median, low, high] of reference ÷ times over paired rounds; low/high: the 2.5 and 97.5
    percentiles of the median over bootstrap resamples of the rounds."""
    ratios = np.asarray(reference) / np.asarray(times)
    rng = np.random.default_rng(seed)
    boot = np.median(ratios[rng.integers(0, len(ratios), size=(BOOTSTRAP, len(ratios)))], axis=1)
    return [float(np.median(ratios)), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


# -- dominance ----------------------------------------------------------------------------------
def _within(a: float, b: float, higher_is_better: bool, relative: bool) -> bool:
    """Score `a` is no worse than `b` beyond the tolerance."""
    if relative:
        return a <= b * (1 + PERPLEXITY_TOLERANCE) if not higher_is_better else a >= b * (1 - PERPLEXITY_TOLERANCE)
    return a >= b - SCORE_TOLERANCE if higher_is_better else a <= b + SCORE_TOLERANCE


def dominates(a: Point, b: Point, higher_is_better: bool, relative: bool) -> bool:
    """No larger on disk, faster at every shape (on the paired medians) and the score within tolerance."""
    faster = all(a.speedup[s][0] > b.speedup[s][0] for s in a.speedup)
    return a.onnx_bytes <= b.onnx_bytes and faster and _within(a.score, b.score, higher_is_better, relative)


def verdict_lines(points: list[Point]) -> list[str]:
    """For every baseline: the edgesvd points that dominate it, or that none does."""
    lines = []
    for b in (p for p in points if p.kind == BASELINE):
        winners = [p.label for p in points if p.kind == EDGESVD and b.label in p.dominates]
        lines.append(f"{', '.join(winners)} dominate{'s' if len(winners) == 1 else ''} {b.label}" if winners
                     else f"no edgesvd point dominates {b.label}")
    return lines


def compare_variants(variants: list[Variant], family: Family, cfg: CompareConfig, eval_file: Path | None,
                     held_out, reporter: Reporter = SILENT) -> Comparison:
    """Score and time every variant (the first one, 'dense', is the reference of every ratio) and
    work out who dominates whom."""
    name, source, scores = score_variants(variants, family, eval_file, held_out, cfg.session, reporter)
    reporter.step(f"comparison: timing {len(variants)} models interleaved ({cfg.runs} rounds per shape, "
                  f"{cfg.clock} clock)")
    timing = interleaved_latency([v.onnx_dir for v in variants], cfg)
    points = []
    for i, v in enumerate(variants):
        points.append(Point(v.label, v.kind, v.precision, list(v.fusions), onnx_files_bytes(v.onnx_dir),
                            scores[v.label],
                            {s: float(np.median(t[i])) for s, t in timing["shapes"].items()},
                            {s: paired_speedup(t[0], t[i]) for s, t in timing["shapes"].items()}))
    relative = family.causal and eval_file is not None  # perplexity: a relative tolerance
    for a in points:
        for b in points:
            if a is not b and dominates(a, b, family.higher_is_better or eval_file is None, relative):
                a.dominates.append(b.label)
                b.dominated_by.append(a.label)
    tolerance = (f"{PERPLEXITY_TOLERANCE:.0%} of perplexity" if relative else f"{SCORE_TOLERANCE} {name}")
    return Comparison(points, name, source, family.higher_is_better or eval_file is None, tolerance,
                      list(timing["shapes"]), timing["clock"], cfg.session_for_clock().to_json(), cfg.runs,
                      [round(x, 2) for x in timing["load_average"]], verdict_lines(points))


def compare_quantized(dense_model, tokenizer, family: Family, checkpoint: Path, name: str, source: str,
                      folder: Path, cfg: CompareConfig, eval_file: Path | None, held_out, fuse: tuple[str, ...] = (),
                      reporter: Reporter = SILENT) -> Comparison:
    """`edgesvd run --compare-quantized`: build the dense baselines and edgesvd's variants (named
    `name`, e.g. 'edgesvd keep 0.50') into `folder`, measure them together and return the
    comparison; the folder is removed afterwards unless cfg.keep_variants."""
    try:
        variants = baseline_variants(dense_model, tokenizer, family, source, folder, reporter)
        record = read_record(checkpoint)[1]
        refusals = {q: quantize_refusal(q, record) for q in edgesvd_precisions(family)}
        variants += edgesvd_variants(checkpoint, name, family, folder, fuse, reporter,
                                     tuple(q for q, why in refusals.items() if not why))
        comparison = compare_variants(variants, family, cfg, eval_file, held_out, reporter)
        comparison.verdict += [f"no {name} {q} point: {why}" for q, why in refusals.items() if why]
        return comparison
    finally:
        if not cfg.keep_variants:
            shutil.rmtree(folder, ignore_errors=True)
