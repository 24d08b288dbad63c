"""`edgesvd run`: compress → export (compressed and dense) → parity → profile → pack, with a summary."""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgesvd.calibration import CalibrationConfig
from edgesvd.checkpoint import atomic_output_dir, check_output_dir, save_compressed
from edgesvd.errors import ConfigError
from edgesvd.evaluate import check_eval_data, check_eval_file, task_score
from edgesvd.learned import LearnedConfig
from edgesvd.loading import DEFAULT_MODEL, resolve_model
from edgesvd.progress import console

from .bundle import pack
from .onnx_export import ExportConfig, export_checkpoint, export_dense
from .parity import ParityConfig, verify
from .profiling import ProfileConfig, profile
from .providers import CPU, SessionConfig


@dataclass(frozen=True)
class RunConfig:
    """Everything `edgesvd run` does, with the defaults of the README's main command."""

    model: str = DEFAULT_MODEL
    method: str | None = None  # None: edgesvd.compress.DEFAULT_METHOD, read when the run starts
    keep: float = 0.5
    rank_multiple: int = 8
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    out_root: Path = Path("edgesvd-out")
    force: bool = False
    export: ExportConfig = field(default_factory=lambda: ExportConfig(pooled=True))
    profile_runs: int = 30
    profile_warmup: int = 5
    batch: int = 1
    seq_len: int = 128
    eps: tuple[str, ...] = (CPU,)
    session: SessionConfig = SessionConfig()
    device: str = "auto"
    show_progress: bool = True
    learned: LearnedConfig = field(default_factory=LearnedConfig)  # method 'learned' only
    eval_file: Path | None = None  # task score of dense and compressed (edgesvd.evaluate.task_score)

    def __post_init__(self) -> None:
        if self.profile_runs < 1:
            raise ConfigError(f"profile runs must be >= 1, got {self.profile_runs}")
        if self.eval_file is not None:
            check_eval_file(self.eval_file)


@dataclass
class RunSummary:
    """What `run` produced and measured; the CLI prints it as the closing table."""

    model: str
    method: str
    keep: float
    out: Path
    bundle: Path
    tarball: Path
    params_dense: int
    params_compressed: int
    onnx_bytes_dense: int
    onnx_bytes_compressed: int
    parity_ok: bool
    parity_detail: str
    latency: list[dict]  # per EP and mode: dense/compressed p50 and speedup
    seconds: dict[str, float]
    quality: dict = field(default_factory=dict)  # with --eval: {score: {dense, compressed, dataset}}

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("out", "bundle", "tarball"):
            d[k] = str(d[k])
        return d


def _params(record, model) -> tuple[int, int]:
    """(dense, compressed) parameter counts: the compressed model's, plus what factorization removed."""
    compressed = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    removed = sum(l.params_before - l.params_after for l in record.layers)
    return compressed + removed, compressed


def _parity_detail(report) -> str:
    parts = []
    for r in report.results:
        if r.status == "skipped":
            continue
        worst = min((m.cosine for m in r.outputs.values()), default=1.0)
        extra = (f"top-1 {r.top1:.3f}, generation {r.generation:.2f}" if r.top1 is not None
                 else f"embedding cosine {r.embedding_cosine:.6f}")
        parts.append(f"{r.provider.replace('ExecutionProvider', '')}: {r.status}, cosine {worst:.6f}, {extra}")
    return "; ".join(parts)


def dense_and_compressed_scores(source, model, tokenizer, eval_file: Path,
                                dense_score: tuple[str, float] | None = None) -> dict:
    """`--eval`: the task score of `model` and of the dense model (`dense_score` when already
    known, else the source loaded again), as the bundle manifest's `quality` section records it."""
    from edgesvd.loading import load_model

    name, compressed = task_score(model, tokenizer, source.family, eval_file)
    if dense_score is None:
        dense_score = task_score(load_model(source), tokenizer, source.family, eval_file)
    return {name: {"dense": dense_score[1], "compressed": compressed, "dataset": str(Path(eval_file).resolve())}}


def run(cfg: RunConfig = RunConfig()) -> RunSummary:
    """Run the whole job into `cfg.out_root/<model>/` (atomically: nothing is left on failure)."""
    # The module, not the function `edgesvd.compress`: DEFAULT_METHOD is read now, at call time.
    compress_mod = importlib.import_module("edgesvd.compress")
    method = cfg.method or compress_mod.DEFAULT_METHOD
    source = resolve_model(cfg.model)
    out = Path(cfg.out_root) / source.name
    check_output_dir(out, cfg.force)
    if cfg.eval_file is not None:
        check_eval_data(cfg.eval_file, source.family)
    # The pooled sentence-embedding output exists for encoders only.
    export_cfg = replace(cfg.export, pooled=cfg.export.pooled and source.family == "encoder")
    seconds: dict[str, float] = {}

    def step(name: str):
        console.print(f"[bold]edgesvd run[/bold] · {name}")
        seconds[name] = time.perf_counter()

    def done(name: str):
        seconds[name] = round(time.perf_counter() - seconds[name], 2)

    with atomic_output_dir(out, cfg.force) as tmp:
        step("compress")
        ccfg = compress_mod.CompressConfig(model=cfg.model, method=method, keep=cfg.keep,
                                           rank_multiple=cfg.rank_multiple, calibration=cfg.calibration,
                                           device=cfg.device, show_progress=cfg.show_progress,
                                           learned=cfg.learned)
        result = compress_mod.compress(ccfg)
        save_compressed(result.model, result.tokenizer, result.record, tmp / "checkpoint", result.spectra)
        params_dense, params_comp = _params(result.record, result.model)
        done("compress")
        quality = {}
        if cfg.eval_file is not None:
            step("evaluate")
            quality = dense_and_compressed_scores(source, result.model, result.tokenizer, cfg.eval_file)
            done("evaluate")
        del result
        step("export")
        comp = export_checkpoint(tmp / "checkpoint", tmp / "onnx", export_cfg)
        dense = export_dense(cfg.model, tmp / "onnx-dense", export_cfg)
        done("export")
        step("verify")
        # CPU always; CUDA too when a GPU works (otherwise the report says why it was skipped).
        parity = verify(tmp / "checkpoint", tmp / "onnx", ParityConfig(session=cfg.session))
        done("verify")
        step("profile")
        prof = profile(tmp / "onnx", tmp / "onnx-dense",
                       ProfileConfig(batch=cfg.batch, seq_len=cfg.seq_len, warmup=cfg.profile_warmup,
                                     runs=cfg.profile_runs, eps=cfg.eps, session=cfg.session))
        done("profile")
        step("pack")
        pack(tmp / "onnx", tmp / "checkpoint", tmp / "bundle", parity.to_json(), prof.to_json(),
             cfg.session.to_json(), extra={"quality": quality} if quality else None)
        done("pack")
        summary = RunSummary(
            model=source.name, method=method, keep=cfg.keep, out=out, bundle=out / "bundle",
            tarball=out / "bundle.tar.gz", params_dense=params_dense, params_compressed=params_comp,
            onnx_bytes_dense=dense.onnx_bytes, onnx_bytes_compressed=comp.onnx_bytes,
            parity_ok=parity.ok, parity_detail=_parity_detail(parity),
            latency=[{k: c[k] for k in ("provider", "mode", "dense_p50_ms", "compressed_p50_ms", "speedup",
                                        "flop_bound_speedup")} for c in prof.comparisons],
            seconds=seconds, quality=quality)
        (tmp / "summary.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    return summary
