"""deploy(compressed, profiles): per device plan → export → parity → measure → bundle; run(config): compress, then deploy.

One orchestrator for both shapes of the job. Several devices with budgets are the general case:
each profile gets its own plan from the compression's component importance (measured and
re-planned on this machine, estimated elsewhere) and its own bundle, and the run ends with a
comparison. A fixed `--keep` is the special case: one target, the model as compressed, with the
dense model measured beside it and a closing summary.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from torch import nn

from edgesvd.calibration import CalibrationConfig, sample_calibration
from edgesvd.checkpoint import CompressionRecord, library_versions, save_compressed
from edgesvd.compression import Compressed, compress_prepared, importance_pass, prepare
from edgesvd.costmodel import model_facts
from edgesvd.errors import ConfigError
from edgesvd.evaluate import agreement_with_dense, check_eval_data, check_eval_file, task_score
from edgesvd.factorize import keep_of
from edgesvd.loading import DEFAULT_MODEL, load_model, resolve_model
from edgesvd.methods import DEFAULT_METHOD, Learned, Method, Whiten, method_config
from edgesvd.outputs import atomic_output_dir, check_output_dir
from edgesvd.planner import Receipt, plan_ranks, resolve_limits
from edgesvd.profiles import Profile, load_profiles
from edgesvd.reporting import SILENT, Reporter

from .baselines import CompareConfig, compare_quantized
from .budgets import (
    Measuring,
    PlanMeasurement,
    at_export_precision,
    cost_model_for,
    export_config_for,
    is_local,
    measure_export,
    plan_keep,
    require_measurable,
    tied,
)
from .bundle import pack
from .closed_loop import closed_loop, missed_budgets, size_offsets
from .comparison import DeviceResult, comparison_markdown
from .export import ExportConfig, export_checkpoint, export_model, onnx_files_bytes
from .parity import ParityConfig, ParityReport, verify
from .profiling import ProfileConfig, profile
from .providers import CPU, CUDA, SessionConfig
from .quantize import form_for, grid_for
from .report import write_report


@dataclass(frozen=True)
class DeployConfig:
    """How a compressed model becomes bundles: export options, execution providers and session
    options, the timed workload of the fixed-keep case (profiles bring their own), repetitions,
    plans tried per device on this machine, the most dense/compressed pairs a latency verdict may
    take, an optional task-score file (`--eval`), and the comparison with onnxruntime's own
    quantization of the dense model (`--compare-quantized`)."""

    export: ExportConfig = field(default_factory=lambda: ExportConfig(pooled=True))
    eps: tuple[str, ...] = (CPU,)
    session: SessionConfig = SessionConfig()
    runs: int = 30
    warmup: int = 5
    batch: int = 1
    seq_len: int = 128
    max_plans: int = 3
    max_pairs: int = 960
    eval_file: Path | None = None
    compare: CompareConfig | None = None  # `run --compare-quantized`: measure the dense baselines beside it

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise ConfigError(f"profile runs must be >= 1, got {self.runs}")
        if self.max_plans < 1:
            raise ConfigError(f"--max-plans must be >= 1, got {self.max_plans}")
        if self.max_pairs < 8:
            raise ConfigError(f"--max-pairs must be >= 8, got {self.max_pairs}")
        if self.eval_file is not None:
            check_eval_file(self.eval_file)


@dataclass
class RunSummary:
    """What a fixed-keep deployment produced and measured; the CLI prints it as the closing table."""

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
    baselines: dict = field(default_factory=dict)  # with --compare-quantized: Comparison.to_json()

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("out", "bundle", "tarball"):
            d[k] = str(d[k])
        return d


@dataclass
class Deployment:
    """Where a deployment went: the summary of the model as compressed, or one result per device."""

    out: Path
    summary: RunSummary | None = None
    devices: list[DeviceResult] = field(default_factory=list)

    @property
    def bundles(self) -> list[Path]:
        return [self.summary.bundle] if self.summary else [d.bundle for d in self.devices]


def _params(record: CompressionRecord, model: nn.Module) -> tuple[int, int]:
    """(dense, compressed) parameter counts: the compressed model's, plus what factorization removed."""
    compressed = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    removed = sum(l.params_before - l.params_after for l in record.layers)
    return compressed + removed, compressed


def parity_detail(report: ParityReport) -> str:
    """One line per execution provider: status, worst cosine, top-1 / embedding cosine."""
    parts = []
    for r in report.results:
        if r.status == "skipped":
            continue
        worst = min((m.cosine for m in r.outputs.values()), default=1.0)
        extra = (f"top-1 {r.top1:.3f}, generation {r.generation:.2f}" if r.top1 is not None
                 else f"embedding cosine {r.embedding_cosine:.6f}")
        parts.append(f"{r.provider.replace('ExecutionProvider', '')}: {r.status}, cosine {worst:.6f}, {extra}")
    return "; ".join(parts)


class _Job:
    """One deployment in its temporary output folder: the dense baselines (exported once per
    precision, scored once) and the stages every target ends with."""

    def __init__(self, ck: Compressed, tmp: Path, config: DeployConfig, reporter: Reporter) -> None:
        self.ck, self.tmp, self.config, self.reporter = ck, tmp, config, reporter
        self.family = ck.source.family
        self._dense_model: nn.Module | None = None
        self._dense_score: tuple[str, float] | None = None
        self.seconds: dict[str, float] = {}

    def step(self, name: str) -> None:
        self.reporter.step(name)
        self.seconds[name] = time.perf_counter()

    def done(self, name: str) -> None:
        self.seconds[name] = round(time.perf_counter() - self.seconds[name], 2)

    def dense_model(self) -> nn.Module:
        """The dense model on the CPU: the copy the compression kept, else loaded again."""
        if self._dense_model is None:
            kept = self.ck.importance.dense if self.ck.importance is not None else None
            self._dense_model = kept if kept is not None else load_model(self.ck.source)
        return self._dense_model

    def dense_dir(self, export: ExportConfig) -> Path:
        """The dense baseline exported at `export`'s precision (once per precision)."""
        where = self.tmp / ("onnx-dense" if export.precision == "fp32" else f"onnx-dense-{export.precision}")
        if not where.exists():
            self.reporter.step(f"dense baseline ({export.precision}), exported to measure beside it")
            export_model(self.dense_model(), self.ck.tokenizer, self.family, where, export, None,
                         str(self.ck.source.path))
        return where

    def quality(self, model: nn.Module) -> dict:
        """`--eval`: the task score of `model` and of the dense model, as the manifest records it."""
        if self.config.eval_file is None:
            return {}
        if self._dense_score is None:
            self._dense_score = task_score(self.dense_model(), self.ck.tokenizer, self.family, self.config.eval_file)
        name, compressed = task_score(model, self.ck.tokenizer, self.family, self.config.eval_file)
        return {name: {"dense": self._dense_score[1], "compressed": compressed,
                       "dataset": str(Path(self.config.eval_file).resolve())}}

    def bundle(self, folder: Path, parity: ParityReport, profile_report: dict, extra: dict | None) -> Path:
        pack(folder / "onnx", folder / "checkpoint", folder / "bundle", parity.to_json(), profile_report,
             self.config.session.to_json(), extra=extra)
        return folder / "bundle"


def _deploy_as_is(job: _Job, out: Path) -> RunSummary:
    """The model as compressed: checkpoint → export (and the dense baseline) → parity → latency of
    both side by side → bundle → summary.json."""
    ck, cfg, tmp = job.ck, job.config, job.tmp
    if ck.model is None:
        raise ConfigError("this compression holds no finished model (it was made to be planned per profile)")
    export_cfg = replace(cfg.export, pooled=cfg.export.pooled and job.family.pooled_output)
    job.step("checkpoint")
    ck.save(tmp / "checkpoint")
    params_dense, params_comp = _params(ck.record, ck.model)
    job.done("checkpoint")
    quality = {}
    if cfg.eval_file is not None:
        job.step("evaluate")
        quality = job.quality(ck.model)
        job.done("evaluate")
    job.step("export")
    comp = export_checkpoint(tmp / "checkpoint", tmp / "onnx", export_cfg)
    dense_dir = job.dense_dir(export_cfg)
    job.done("export")
    job.step("verify")
    # CPU always; CUDA too when a GPU works (otherwise the report says why it was skipped).
    parity = verify(tmp / "checkpoint", tmp / "onnx", ParityConfig(session=cfg.session))
    job.done("verify")
    job.step("profile")
    prof = profile(tmp / "onnx", dense_dir, ProfileConfig(batch=cfg.batch, seq_len=cfg.seq_len, warmup=cfg.warmup,
                                                          runs=cfg.runs, eps=cfg.eps, session=cfg.session))
    job.done("profile")
    baselines = {}
    if cfg.compare is not None:
        job.step("compare")
        name = f"edgesvd keep {keep_of(ck.record.layers):.2f}"
        baselines = compare_quantized(job.dense_model(), ck.tokenizer, job.family, tmp / "checkpoint", name,
                                      str(ck.source.path), tmp / "baselines", cfg.compare, cfg.eval_file,
                                      _held_out(ck, job.dense_model()), export_cfg.fuse, job.reporter).to_json()
        job.done("compare")
    job.step("pack")
    extra = {k: v for k, v in (("quality", quality), ("baselines", baselines)) if v}
    job.bundle(tmp, parity, prof.to_json(), extra or None)
    job.done("pack")
    summary = RunSummary(
        model=ck.source.name, method=ck.record.method, keep=ck.record.keep_requested, out=out, bundle=out / "bundle",
        tarball=out / "bundle.tar.gz", params_dense=params_dense, params_compressed=params_comp,
        onnx_bytes_dense=onnx_files_bytes(dense_dir), onnx_bytes_compressed=comp.onnx_bytes,
        parity_ok=parity.ok, parity_detail=parity_detail(parity),
        latency=[{k: c[k] for k in ("provider", "mode", "dense_p50_ms", "compressed_p50_ms", "speedup",
                                    "flop_bound_speedup")} for c in prof.comparisons],
        seconds=job.seconds, quality=quality, baselines=baselines)
    (tmp / "summary.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    return summary


def _values_are(p: Profile, local: bool, source: str) -> str:
    if not local:
        return f"{source} (not measured)"
    if p.runtime.execution_provider == CUDA:
        return "measured on this machine (peak memory estimated: GPU memory is not measured)"
    return "measured on this machine"


def _rescale_latency(receipt: Receipt, factor: float) -> None:
    """Scale a receipt's planned latencies: a tied plan estimates a ratio to the dense model, and the
    dense model measured beside the plan (under that moment's load) sets its milliseconds."""
    for key in ("latency_p50", "latency_p90"):
        receipt.totals[key] *= factor
    for row in receipt.rows:
        row.ms *= factor
    for b in receipt.budgets:
        if b.key.startswith("latency"):
            b.value *= factor


def _tie_sizes(receipt: Receipt, offsets: dict[str, float]) -> None:
    """Shift a receipt's planned sizes by `offsets` (closed_loop.size_offsets, what the closed loop
    planned with), so the plan's bytes are shown as what the export is expected to weigh."""
    for key, offset in offsets.items():
        if key not in receipt.totals:
            continue
        receipt.totals[key] += offset
        for b in receipt.budgets:
            if b.key == key:
                b.value += offset


def _deploy_profile(job: _Job, p: Profile, cost, held_out, out: Path) -> DeviceResult:
    """One device: plan → build → export → (on this machine: measure, re-plan while a budget is
    missed) → parity → quality → bundle whose manifest holds budgets, receipt and values."""
    ck, cfg, family = job.ck, job.config, job.family
    start = time.perf_counter()
    local = is_local(p)
    export_cfg = export_config_for(cfg.export, p, family)
    dense_values = cost.dense()
    measure = None
    if local:  # tied to the dense model measured here; relative budgets are relative to it
        dense_dir = job.dense_dir(export_cfg)
        how = _measuring(cfg)
        cost, dense_measured = tied(cost, dense_dir, p, family, how)
        dense_values = {**cost.dense(), **dense_measured}
        job.reporter.info(f"{p.name}: dense model measured here: p50 {dense_measured['latency_p50']:.2f} ms, "
                          f"{100 * cost.layer_share:.0f}% of its kernel time in the layers edgesvd factorizes")

        def measure(onnx_dir: Path, limits: dict[str, float]) -> PlanMeasurement:
            return measure_export(onnx_dir, dense_dir, p, family, limits, how)

    limits = resolve_limits(p.budgets, dense_values)
    folder = job.tmp / p.name

    def build(receipt: Receipt, where: Path, attempt: int) -> nn.Module:
        model, records, entries, details = ck.importance.build(ck.importance.plan(receipt.ranks()), job.reporter)
        record = CompressionRecord(
            method=ck.importance.method, keep_requested=round(keep_of(records), 4), family=family.name,
            source_model=ck.record.source_model, layers=records, rank_multiple=p.rank_multiple,
            calibration=ck.record.calibration, details={"planner": "budget", "profile": p.name, "plan": attempt,
                                                         **details}, versions=library_versions())
        save_compressed(model, ck.tokenizer, record, where / "checkpoint", entries, force=True)
        export_checkpoint(where / "checkpoint", where / "onnx", export_cfg, force=True)
        return model

    chosen, history = closed_loop(p, ck.importance.layers, cost, limits, dense_values, build, folder, measure,
                                  cfg.max_plans, job.reporter)
    receipt, model, values = chosen.receipt, chosen.model, chosen.values
    limits, dense_values = chosen.limits, chosen.dense
    if local:  # the dense model measured beside the chosen plan, and the plan's estimate at that dense latency
        _rescale_latency(receipt, dense_values["latency_p50"] / cost.dense()["latency_p50"])
        _tie_sizes(receipt, size_offsets(cost.dense(), dense_values))
        receipt.dense = {**receipt.dense, **dense_values}
    parity = verify(folder / "checkpoint", folder / "onnx", ParityConfig(session=cfg.session))
    proxy = agreement_with_dense(job.dense_model(), model, held_out, family)
    task = job.quality(model)
    quality = {**{k: v["compressed"] for k, v in task.items()}, **proxy}  # the task score first
    for b in receipt.budgets:  # judged by measurement where there is one
        b.limit, b.binding = limits[b.key], False
        b.measured = values[b.key] if local else None
        b.headroom = (b.limit - (b.value if b.measured is None else b.measured)) / b.limit
    if receipt.budgets:
        min(receipt.budgets, key=lambda b: b.headroom).binding = True
    verdicts = {k: v.to_json() for k, v in chosen.verdicts.items()}
    extra = {"budgets": {
        "profile": p.name, "profile_file": p.path, "device": p.device.name,
        "execution_provider": p.runtime.execution_provider, "precision": p.runtime.precision,
        "workload": asdict(p.workload), "limits": limits,
        "as_written": {k: str(b) for k, b in p.budgets.items()},
        "values": values, "values_are": _values_are(p, local, cost.source),
        "dense": dense_values, "met": chosen.met if local else not missed_budgets(limits, values),
        "certified": verdicts, "plans": history or [{"plan": 1}],
        "quality_proxy": proxy, "receipt": receipt.to_json()}}
    if local:
        extra["budgets"]["latency_measurement"] = (chosen.measurement.report.get("paired") or {})
        extra["budgets"]["cost_model"] = {"tied_to_dense_p50_ms": cost.dense()["latency_p50"],
                                          "layer_share": cost.layer_share, "layer_table": cost.table_info}
    if task:
        extra["quality"] = task
    job.bundle(folder, parity, chosen.report, extra)
    job.reporter.step(f"{p.name} done in {time.perf_counter() - start:.0f}s")
    return DeviceResult(p.name, p.device.name, "measured" if local else cost.source, out / p.name / "bundle",
                        int(onnx_files_bytes(folder / "onnx")), receipt, values, local, limits, len(history) or 1,
                        history, quality, parity.ok, verdicts)


def _held_out(ck: Compressed, dense: nn.Module):
    """32 calibration sequences the compression did not see (the next seed): the quality proxy's text
    (`dense`: the model that samples them when the calibration is the decoder's own text)."""
    calib = ck.calibration or CalibrationConfig()
    return sample_calibration(ck.tokenizer, replace(calib, num_sequences=32, seed=calib.seed + 1), ck.source.family, dense)


def _measuring(cfg: DeployConfig) -> Measuring:
    return Measuring(cfg.runs, cfg.warmup, cfg.session, cfg.max_pairs)


def _cost_models(ck: Compressed, profiles: list[Profile], config: DeployConfig, reporter: Reporter) -> dict:
    """A cost model per profile. Those of this machine are tied to the dense model measured here
    (exported once per precision into a temporary folder), so the plans made before anything is
    deployed -- how far importance is learned, whether a budget is feasible -- already count the
    part of the model factorization leaves alone."""
    family = ck.source.family
    facts = model_facts(ck.importance.dense, [l.shape.name for l in ck.importance.layers], family,
                        ck.importance.pivoted)
    costs = {p.name: cost_model_for(p, facts, reporter=reporter) for p in profiles}
    local = [p for p in profiles if is_local(p)]
    if local:
        with tempfile.TemporaryDirectory(prefix="edgesvd-dense-") as tmp:
            for p in local:
                export_cfg = export_config_for(config.export, p, family)
                where = Path(tmp) / export_cfg.precision
                if not where.exists():
                    reporter.step(f"dense baseline ({export_cfg.precision}), exported to tie the cost model to it")
                    export_model(ck.importance.dense, ck.tokenizer, family, where, export_cfg, None, str(ck.source.path))
                costs[p.name] = tied(costs[p.name], where, p, family, _measuring(config))[0]
    return costs


def deploy(ck: Compressed, profiles: Sequence[str | Profile] = (), out: str | Path | None = None, *,
           budgets: dict[str, str] | None = None, config: DeployConfig = DeployConfig(), force: bool = False,
           reporter: Reporter = SILENT, cost_models: dict | None = None, inputs: Sequence = ()) -> Deployment:
    """Turn a compression into bundles under `out` (default `edgesvd-out/<model>`), atomically.

    Without profiles: one bundle of the model as compressed, measured beside the dense model.
    With profiles (names, .toml paths or Profile objects; `budgets` override theirs, e.g.
    {"latency_p50": "60%"}): one plan, bundle and report per device from the compression's
    component importance, and a comparison across devices. `inputs`: paths `out` must not overlap
    (the source model, data files), besides the source recorded in the compression.
    """
    chosen = at_export_precision(load_profiles(profiles, budgets), config.export)
    require_measurable(chosen)
    out = Path(out) if out is not None else Path("edgesvd-out") / ck.source.name
    inputs = (ck.source.path, config.eval_file, *inputs)
    check_output_dir(out, force, inputs)
    if config.eval_file is not None:
        check_eval_data(config.eval_file, ck.source.family)
    if chosen and config.compare is not None:
        raise ConfigError("--compare-quantized measures the model as compressed at one keep; run it without "
                          "--profile/--budget")
    if chosen and ck.importance is None:
        raise ConfigError(f"plans for devices need component importance: compress with the whiten or learned "
                          f"method (this compression used '{ck.record.method}')")
    costs = cost_models or (_cost_models(ck, chosen, config, reporter) if chosen else {})
    for p in chosen:  # an infeasible budget fails here, before anything is exported
        plan_ranks(ck.importance.layers, costs[p.name])
    with atomic_output_dir(out, force, inputs) as tmp:
        job = _Job(ck, tmp, config, reporter)
        if not chosen:
            return Deployment(out, summary=_deploy_as_is(job, out))
        held_out = _held_out(ck, ck.importance.dense)
        results = [_deploy_profile(job, p, costs[p.name], held_out, out) for p in chosen]
        (tmp / "comparison.json").write_text(json.dumps([r.to_json() for r in results], indent=2, default=str) + "\n")
        (tmp / "comparison.md").write_text(comparison_markdown(results) + "\n")
        for r in results:  # comparison.json exists now: every device's report gets the trade-off chart
            write_report(tmp / r.profile / "bundle")
    return Deployment(out, devices=results)


@dataclass(frozen=True)
class RunConfig:
    """Everything `edgesvd run` does, with the defaults of the README's main command.

    method: a method name (with `keep`, `rank_multiple` and `form`) or a Method config (which carries
    its own); None is edgesvd.compression.DEFAULT_METHOD. profiles / budgets: plan per device instead of
    `keep` (budgets override every profile's, e.g. {"latency_p50": "60%"}).
    """

    model: str = DEFAULT_MODEL
    method: Method | str | None = None
    keep: float = 0.5
    rank_multiple: int = 8
    form: str | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    device: str = "auto"
    profiles: tuple[str, ...] = ()
    budgets: dict[str, str] | None = None
    out_root: Path = Path("edgesvd-out")
    force: bool = False
    deploy: DeployConfig = field(default_factory=DeployConfig)


def run(cfg: RunConfig = RunConfig(), reporter: Reporter = SILENT) -> Deployment:
    """`edgesvd run`: check everything that can fail fast → prepare (load, calibrate, statistics) →
    [with profiles: whitened plans, infeasible budgets fail here; learn importance once, down to
    the tightest plan] → compress → deploy, into `out_root/<model>/` atomically."""
    start = time.perf_counter()
    source = resolve_model(cfg.model)
    out = Path(cfg.out_root) / source.name
    inputs = (source.path, cfg.deploy.eval_file, *cfg.calibration.paths())
    check_output_dir(out, cfg.force, inputs)
    profiles = at_export_precision(load_profiles(cfg.profiles or (("host",) if cfg.budgets else ()), cfg.budgets),
                                   cfg.deploy.export)
    require_measurable(profiles)
    if profiles and cfg.deploy.compare is not None:
        raise ConfigError("--compare-quantized measures the model as compressed at one keep; run it without "
                          "--profile/--budget")
    if cfg.deploy.eval_file is not None:
        check_eval_data(cfg.deploy.eval_file, source.family)
    # A run that will quantize builds its factors in the form that quantization survives (exporters/quantize.py).
    quantize = cfg.deploy.export.quantize
    if cfg.form and form_for(quantize) not in (None, cfg.form):
        raise ConfigError(f"--quantize {quantize} needs --form {form_for(quantize)}: {quantize} weights break "
                          f"{cfg.form} factors")
    form = cfg.form or form_for(quantize)
    # The learned method then fine-tunes its factors through the grid they will be rounded to.
    method = method_config(cfg.method or DEFAULT_METHOD, keep=cfg.keep, rank_multiple=cfg.rank_multiple, form=form,
                           quantize_aware=grid_for(quantize))
    if profiles and not isinstance(method, (Whiten, Learned)):
        raise ConfigError(f"--profile plans with method learned or whiten, not '{method.name}'")
    multiple = min(p.rank_multiple for p in profiles) if profiles else method.rank_multiple
    reporter.step("compress")
    prepared = prepare(source, cfg.calibration, device=cfg.device, need_stats=method.needs_statistics,
                       reporter=reporter, rank_multiple=multiple, form=method.form)
    if not profiles:
        ck = compress_prepared(prepared, method, cfg.model, reporter=reporter)
        compressed_s = time.perf_counter() - start
        deployment = deploy(ck, (), out, config=cfg.deploy, force=cfg.force, reporter=reporter, inputs=inputs)
        deployment.summary.seconds = {"compress": round(compressed_s, 2), **deployment.summary.seconds}
        return deployment
    method = replace(method, rank_multiple=multiple)
    whitened = importance_pass(prepared, Whiten(keep=method.keep, rank_multiple=method.rank_multiple,
                                                form=method.form),
                               reporter=reporter)
    ck = compress_prepared(prepared, method, cfg.model, whitened, build=False, reporter=reporter)
    costs = _cost_models(ck, profiles, cfg.deploy, reporter)
    keeps = [plan_keep(plan_ranks(whitened.layers, costs[p.name])) for p in profiles]  # infeasible budgets fail here
    if isinstance(method, Learned):
        keep = min(keeps)
        reporter.step(f"learning importance once for {len(profiles)} device(s), pruning to keep {keep:.3f} "
                      "(the tightest whitened plan)")
        method = replace(method, keep=keep)
        importance = importance_pass(prepared, method, whitened.spectra, whitened.dense, reporter)
        ck = compress_prepared(prepared, method, cfg.model, importance, build=False, reporter=reporter)
    return deploy(ck, profiles, out, config=cfg.deploy, force=cfg.force, reporter=reporter, cost_models=costs,
                  inputs=inputs)
