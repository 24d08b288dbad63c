"""Click commands export / verify / profile / pack / run, registered on the `edgesvd` group."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from edgesvd.cli_options import calibration_options

_PATH = click.Path(path_type=Path)


def _ep_options(f):
    f = click.option("--allow-cpu-fallback", is_flag=True,
                     help="If the CUDA EP is asked for and no GPU works, use the CPU EP instead of failing.")(f)
    f = click.option("--ep", "eps", multiple=True, default=("auto",), show_default=True,
                     type=click.Choice(["auto", "cpu", "cuda"]),
                     help="Execution provider(s): auto = CPU, plus CUDA when a GPU works. Repeatable.")(f)
    return f


def _session_options(f):
    f = click.option("--opt-level", type=click.Choice(["disable", "basic", "extended", "all"]), default="all",
                     show_default=True, help="onnxruntime graph optimization level.")(f)
    f = click.option("--inter-threads", type=int, default=1, show_default=True,
                     help="onnxruntime inter-op threads.")(f)
    f = click.option("--threads", type=int, default=0, show_default=True,
                     help="onnxruntime intra-op threads (0: one per physical core).")(f)
    return f


def _session(threads: int, inter_threads: int, opt_level: str):
    from .providers import SessionConfig

    return SessionConfig(threads, inter_threads, opt_level)


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM becomes SystemExit, so atomic output folders remove their temporary copy."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def _write_json(path: Path | None, data: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        click.echo(f"wrote {path}")


def _short(provider: str) -> str:
    return provider.replace("ExecutionProvider", "")


def print_parity(report) -> None:
    """The parity report as a table: one row per EP and output."""
    from edgesvd.cli import out_console
    from rich.table import Table

    th = report.thresholds
    table = Table(title=f"parity {report.onnx_dir} vs {report.checkpoint} ({report.family}, {report.precision}; "
                        f"inputs {report.inputs['input_ids_shape']})")
    for col in ("EP", "status", "output", "max abs", "max rel", "cosine", "top-1", "generation", "emb. cosine"):
        table.add_column(col, justify="left" if col in ("EP", "status", "output") else "right")
    for r in report.results:
        if r.status == "skipped":
            table.add_row(_short(r.provider), "skipped", r.reason, "", "", "", "", "", "")
            continue
        for i, (name, m) in enumerate(r.outputs.items()):
            first = i == 0
            table.add_row(_short(r.provider) if first else "", r.status if first else "", name, f"{m.max_abs:.2e}",
                          f"{m.max_rel:.2e}", f"{m.cosine:.6f}",
                          f"{r.top1:.3f}" if first and r.top1 is not None else "",
                          f"{r.generation:.2f}" if first and r.generation is not None else "",
                          f"{r.embedding_cosine:.6f}" if first and r.embedding_cosine is not None else "")
    max_rel = "∞" if th.max_rel == float("inf") else f"{th.max_rel:.0e}"
    table.caption = (f"pass if max rel ≤ {max_rel}, cosine ≥ {th.cosine}, top-1 ≥ {th.top1}, "
                     f"generation ≥ {th.generation}, embedding cosine ≥ {th.embedding_cosine}")
    out_console.print(table)
    for r in report.results:
        for failure in r.failures:
            out_console.print(f"[red]FAIL[/red] {_short(r.provider)}: {failure}")


def print_profile(report) -> None:
    """Latency per model/EP/mode, then dense → compressed ratios beside the FLOP bound."""
    from edgesvd.cli import out_console
    from edgesvd.units import fmt_bytes
    from rich.table import Table

    c = report.config
    table = Table(title=f"onnxruntime latency ({c['family']}, batch {c['batch']}, seq {c['seq_len']}, "
                        f"{c['runs']} runs after {c['warmup']} warm-up)")
    for col in ("model", "EP", "mode", "p50 ms", "p90 ms", "p99 ms", "throughput/s", "session s", "peak RSS MB", "ONNX"):
        table.add_column(col, justify="left" if col in ("model", "EP", "mode") else "right")
    for m in report.measurements:
        for mode, s in m.modes.items():
            table.add_row(m.model, _short(m.provider), mode, f"{s['p50_ms']:.2f}", f"{s['p90_ms']:.2f}",
                          f"{s['p99_ms']:.2f}", f"{s['throughput_per_s']:.1f}", f"{m.session_create_s:.2f}",
                          f"{m.peak_rss_mb:.0f}", fmt_bytes(m.onnx_bytes))
    out_console.print(table)
    if report.comparisons:
        ratio = Table(title="dense → compressed")
        for col in ("EP", "mode", "dense p50 ms", "compressed p50 ms", "speedup", "FLOP ratio", "FLOP bound", "of bound"):
            ratio.add_column(col, justify="left" if col in ("EP", "mode") else "right")
        for r in report.comparisons:
            ratio.add_row(_short(r["provider"]), r["mode"], f"{r['dense_p50_ms']:.2f}", f"{r['compressed_p50_ms']:.2f}",
                          f"{r['speedup']:.2f}×", f"{r['flop_ratio']:.3f}", f"{r['flop_bound_speedup']:.2f}×",
                          f"{r['fraction_of_bound']:.0%}")
        out_console.print(ratio)
    profiled = [m for m in report.measurements if m.per_layer_ms]
    if profiled:
        per = Table(title="per-layer kernel time (ms per run, onnxruntime profiler)", min_width=64)
        per.add_column("block")
        for m in profiled:
            per.add_column(f"{m.model} {_short(m.provider)}", justify="right")
        blocks = list(dict.fromkeys(b for m in profiled for b in m.per_layer_ms))
        for b in blocks:
            per.add_row(b, *(f"{m.per_layer_ms.get(b, 0.0):.3f}" for m in profiled))
        out_console.print(per)


def print_summary(s) -> None:
    """The closing table of `edgesvd run`."""
    from edgesvd.cli import _fmt_int, out_console
    from edgesvd.units import fmt_bytes
    from rich.table import Table

    table = Table(title=f"edgesvd run — {s.model}, method {s.method}, keep {s.keep}")
    for col in ("", "dense", "compressed", "ratio"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row("parameters", _fmt_int(s.params_dense), _fmt_int(s.params_compressed),
                  f"{s.params_compressed / s.params_dense:.3f}")
    table.add_row("ONNX bytes", fmt_bytes(s.onnx_bytes_dense), fmt_bytes(s.onnx_bytes_compressed),
                  f"{s.onnx_bytes_compressed / s.onnx_bytes_dense:.3f}")
    for lat in s.latency:
        table.add_row(f"p50 {lat['mode']} ({_short(lat['provider'])})", f"{lat['dense_p50_ms']:.2f} ms",
                      f"{lat['compressed_p50_ms']:.2f} ms", f"{lat['speedup']:.2f}× faster "
                      f"(FLOP bound {lat['flop_bound_speedup']:.2f}×)")
    for name, q in s.quality.items():
        table.add_row(name.replace("_", " "), f"{q['dense']:.4f}", f"{q['compressed']:.4f}",
                      f"{q['compressed'] - q['dense']:+.4f} ({Path(q['dataset']).name})")
    table.add_row("parity", "", "passed" if s.parity_ok else "FAILED", s.parity_detail, end_section=True)
    table.add_row("bundle", "", str(s.tarball), "")
    out_console.print(table)
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in s.seconds.items())
    out_console.print(f"wrote {s.out} ({steps})")
    out_console.print(f"report: {s.bundle / 'report.html'}")


@click.command()
@click.argument("checkpoint", type=_PATH)
@click.option("--out", "out", type=_PATH, required=True, help="Folder to write the ONNX model into.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: optimum's choice for the model).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Weight and compute dtype; fp16 keeps float32 inputs/outputs.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Dynamic int8 weight quantization of the MatMuls (per channel), on top of the factorization.")
@click.option("--pooled", is_flag=True, help="Encoders: add a mean-pooled `sentence_embedding` output.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
def export(checkpoint, out, opset, dtype, quantize, pooled, force):
    """Export a compressed CHECKPOINT to ONNX (each factorized layer stays two MatMuls)."""
    _exit_cleanly_on_sigterm()
    from .onnx_export import ExportConfig, export_checkpoint

    cfg = ExportConfig(opset=opset, dtype=dtype, quantize=quantize, pooled=pooled)
    r = export_checkpoint(checkpoint, out, cfg, force)
    click.echo(f"wrote {out}: {r.task}, {r.precision}, opset {r.opset}, {r.onnx_bytes / 1e6:.2f} MB ONNX "
               f"in {r.seconds:.1f}s; {r.check.summary()}")


@click.command()
@click.argument("checkpoint", type=_PATH)
@click.argument("onnx_dir", type=_PATH)
@_ep_options
@_session_options
@click.option("--batch", type=int, default=4, show_default=True, help="Sentences / sequences compared.")
@click.option("--seq-len", type=int, default=64, show_default=True, help="Tokens per sequence.")
@click.option("--new-tokens", type=int, default=16, show_default=True, help="Decoders: greedy tokens compared.")
@click.option("--json", "json_out", type=_PATH, default=None, help="Also write the report as JSON.")
def verify(checkpoint, onnx_dir, eps, allow_cpu_fallback, threads, inter_threads, opt_level, batch, seq_len,
           new_tokens, json_out):
    """Parity of ONNX_DIR against the compressed PyTorch CHECKPOINT; exit code 1 on failure."""
    from edgesvd.errors import ParityError

    from .parity import ParityConfig, verify as run_verify
    from .providers import CUDA, resolve_eps

    providers = resolve_eps(tuple(eps), allow_cpu_fallback)
    if "auto" in eps and CUDA not in providers:
        providers.append(CUDA)  # reported as skipped, with the reason
    cfg = ParityConfig(batch=batch, seq_len=seq_len, new_tokens=new_tokens, eps=tuple(providers),
                       session=_session(threads, inter_threads, opt_level))
    try:
        report = run_verify(checkpoint, onnx_dir, cfg)
    except ParityError as exc:
        print_parity(exc.report)
        _write_json(json_out, exc.report.to_json())
        raise
    print_parity(report)
    _write_json(json_out, report.to_json())


@click.command()
@click.argument("onnx_dir", type=_PATH)
@click.option("--dense", "dense_dir", type=_PATH, default=None,
              help="Dense ONNX folder to compare with (default: export the checkpoint's source model now).")
@click.option("--no-dense", is_flag=True, help="Measure the compressed model only.")
@_ep_options
@_session_options
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--seq-len", type=int, default=128, show_default=True,
              help="Encoders: tokens per sequence; decoders: prompt length (prefill) and KV-cache length (decode).")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed runs first.")
@click.option("--runs", type=int, default=50, show_default=True, help="Timed runs.")
@click.option("--per-node", is_flag=True, help="Also profile kernels (separate session) and sum them per layer.")
@click.option("--json", "json_out", type=_PATH, default=None, help="Also write the report as JSON.")
def profile(onnx_dir, dense_dir, no_dense, eps, allow_cpu_fallback, threads, inter_threads, opt_level, batch,
            seq_len, warmup, runs, per_node, json_out):
    """Latency and memory of ONNX_DIR under onnxruntime, dense and compressed side by side."""
    from edgesvd.checkpoint import read_record

    from .onnx_export import ExportConfig, export_dense, read_export
    from .profiling import ProfileConfig, profile as run_profile
    from .providers import resolve_eps

    cfg = ProfileConfig(batch=batch, seq_len=seq_len, warmup=warmup, runs=runs,
                        eps=tuple(resolve_eps(tuple(eps), allow_cpu_fallback)),
                        session=_session(threads, inter_threads, opt_level), per_node=per_node)
    meta = read_export(onnx_dir)
    with tempfile.TemporaryDirectory(prefix="edgesvd-dense-") as tmp:
        if dense_dir is None and not no_dense:
            _, record = read_record(meta["source"])
            click.echo(f"exporting the dense baseline {record.source_model} …", err=True)
            dense_dir = export_dense(record.source_model, Path(tmp) / "dense", ExportConfig(**meta["config"])).out
        report = run_profile(onnx_dir, None if no_dense else dense_dir, cfg)
    print_profile(report)
    _write_json(json_out, report.to_json())


@click.command()
@click.argument("onnx_dir", type=_PATH, required=False)
@click.option("--checkpoint", type=_PATH, default=None,
              help="Compressed checkpoint the ONNX came from (default: the one recorded at export).")
@click.option("--out", "out", type=_PATH, default=None, help="Bundle folder to write (BUNDLE.tar.gz beside it).")
@click.option("--parity-report", type=_PATH, default=None, help="JSON from `verify --json` (default: verify now).")
@click.option("--profile-report", type=_PATH, default=None, help="JSON from `profile --json` (default: profile now).")
@click.option("--runs", type=int, default=20, show_default=True, help="Timed runs when profiling now.")
@click.option("--check", "check_path", type=_PATH, default=None,
              help="Instead of packing: re-verify every file of BUNDLE (folder or .tar.gz) against its manifest.")
@click.option("--force", is_flag=True, help="Replace the bundle folder and archive if they exist.")
def pack(onnx_dir, checkpoint, out, parity_report, profile_report, runs, check_path, force):
    """Pack ONNX_DIR into a deployable bundle, or check one with --check BUNDLE."""
    _exit_cleanly_on_sigterm()
    from edgesvd.errors import ConfigError

    from .bundle import check_bundle, pack as run_pack
    from .onnx_export import read_export
    from .parity import ParityConfig, verify as run_verify
    from .profiling import ProfileConfig, profile as run_profile

    if check_path is not None:
        manifest = check_bundle(check_path)
        click.echo(f"ok: {check_path} — {len(manifest['files'])} files match manifest.json "
                   f"(schema {manifest['schema_version']}, {manifest['source']['model']}, "
                   f"{manifest['compression']['method']} keep {manifest['compression']['keep_actual']:.3f})")
        return
    if onnx_dir is None or out is None:
        raise ConfigError("pack needs ONNX_DIR and --out (or --check BUNDLE)")
    meta = read_export(onnx_dir)
    checkpoint = checkpoint or Path(meta["source"])

    def load(path):
        try:
            return json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read report {path}: {exc}") from exc

    parity = load(parity_report) if parity_report else run_verify(checkpoint, onnx_dir, ParityConfig()).to_json()
    if parity_report and not parity.get("ok"):
        raise ConfigError(f"{parity_report} records a failed parity check; refusing to pack")
    prof = load(profile_report) if profile_report else run_profile(onnx_dir, None, ProfileConfig(runs=runs)).to_json()
    bundle = run_pack(onnx_dir, checkpoint, out, parity, prof, force=force)
    click.echo(f"wrote {bundle} and {bundle}.tar.gz")


@click.command()
@click.argument("model", default="minilm", required=False)
@click.option("--method", default=None,
              help="Compression method (default: the best available, edgesvd.compress.DEFAULT_METHOD).")
@click.option("--keep", type=float, default=0.5, show_default=True, help="Targeted parameters kept, in (0, 1].")
@click.option("--rank-multiple", type=int, default=8, show_default=True, help="Round ranks to this multiple.")
@calibration_options
@click.option("--out-root", type=_PATH, default=Path("edgesvd-out"), show_default=True,
              help="Everything goes to OUT_ROOT/<model>/.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--quantize", type=click.Choice(["int8"]), default=None)
@_ep_options
@_session_options
@click.option("--runs", type=int, default=30, show_default=True, help="Timed onnxruntime runs per model.")
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size when profiling.")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Sequence length when profiling.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where compression runs (torch).")
@click.option("--profile", "profile_refs", multiple=True, metavar="NAME|PATH",
              help="Plan per-layer ranks for this hardware profile's budgets instead of --keep (built-in name "
                   "or .toml path). Repeatable: one importance pass, one bundle per device.")
@click.option("--budget", "budget_items", multiple=True, metavar="KEY=VALUE",
              help="Override a budget of every --profile (implies --profile host when none is given): "
                   "model_bytes, peak_memory, latency_p50, latency_p90 = '60%', '40 MB', '20 ms' or 'none'.")
@click.option("--max-plans", type=int, default=3, show_default=True,
              help="With --profile on this machine: plans tried while a measured budget is missed.")
@click.option("--eval", "eval_file", type=_PATH, default=None, metavar="FILE",
              help="Also score dense and compressed PyTorch models on a task: STS-B Spearman for encoders "
                   "(an STS-B tab-separated file, e.g. sts-dev.csv), perplexity for decoders (a text file). "
                   "Shown in the summary, recorded in the manifest and the report.")
@click.option("--force", is_flag=True, help="Replace OUT_ROOT/<model>/ if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(model, method, keep, rank_multiple, calib, calib_samples, calib_len, seed, out_root, dtype, quantize, eps,
        allow_cpu_fallback, threads, inter_threads, opt_level, runs, batch, seq_len, device, force, quiet,
        profile_refs=(), budget_items=(), max_plans=3, eval_file=None):
    """The whole job: compress MODEL, export, verify, profile dense vs compressed, pack a bundle."""
    _exit_cleanly_on_sigterm()
    from edgesvd.calibration import CalibrationConfig

    from .onnx_export import ExportConfig
    from .pipeline import RunConfig, run as run_pipeline
    from .providers import resolve_eps

    cfg = RunConfig(model=model, method=method, keep=keep, rank_multiple=rank_multiple,
                    calibration=CalibrationConfig(tuple(calib), calib_samples, calib_len, seed),
                    out_root=out_root, force=force,
                    export=ExportConfig(dtype=dtype, quantize=quantize, pooled=True),
                    profile_runs=runs, batch=batch, seq_len=seq_len,
                    eps=tuple(resolve_eps(tuple(eps), allow_cpu_fallback)),
                    session=_session(threads, inter_threads, opt_level), device=device, show_progress=not quiet,
                    eval_file=eval_file)
    if profile_refs or budget_items:  # budgets → ranks per device: exporters/budget_loop.py
        from .budget_loop import run_with_profiles

        run_with_profiles(cfg, profile_refs or ("host",), budget_items, max_plans)
        return
    print_summary(run_pipeline(cfg))


@click.command()
@click.argument("bundle", type=_PATH)
@click.option("--compare", "compare", multiple=True, type=_PATH, metavar="BUNDLE",
              help="Another bundle (other keep or device) to place on the trade-off chart. Repeatable.")
def report(bundle, compare):
    """Write BUNDLE/report.html: summary and budgets, per-layer and spectrum charts, latency, quality."""
    from .report import write_report

    path = write_report(bundle, compare)
    click.echo(f"wrote {path} ({path.stat().st_size:,} bytes)")


def register(group: click.Group) -> None:
    """Add the exporters' commands to the `edgesvd` click group."""
    for command in (export, verify, profile, pack, run, report):
        group.add_command(command)
