"""`edgesvd export`, `verify`, `profile`, `pack` and `report`: the ONNX side of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgesvd.errors import ParityError
from edgesvd.exporters.bundle import pack_export
from edgesvd.exporters.export import ExportConfig, export_checkpoint
from edgesvd.exporters.manifest import SIGNATURE, verify_bundle
from edgesvd.exporters.parity import ParityConfig
from edgesvd.exporters.parity import verify as verify_export
from edgesvd.exporters.profiling import ProfileConfig, profile_against_dense
from edgesvd.exporters.providers import CUDA, SessionConfig, resolve_eps
from edgesvd.exporters.quantize import QUANTIZATIONS
from edgesvd.exporters.report import write_report
from edgesvd.outputs import check_output_file, write_file

from .options import PATH, ep_options, exit_cleanly_on_sigterm, fuse_option, out_console, reporter, session_options
from .printing import print_parity, print_profile


def json_option(f):
    """`--json FILE` and the `--force` that lets it replace an existing file."""
    f = click.option("--force", is_flag=True, help="Replace the --json file if it exists.")(f)
    return click.option("--json", "json_out", type=PATH, default=None,
                        help="Also write the report as JSON (an existing file is refused unless --force).")(f)


def _write_json(path: Path | None, data: dict, force: bool) -> None:
    if path is not None:
        write_file(path, json.dumps(data, indent=2) + "\n", force)
        click.echo(f"wrote {path}")


@click.command()
@click.argument("checkpoint", type=PATH)
@click.option("--out", "out", type=PATH, required=True, help="Folder to write the ONNX model into.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: optimum's choice for the model).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Weight and compute dtype; fp16 keeps float32 inputs/outputs.")
@click.option("--quantize", type=click.Choice(QUANTIZATIONS), default=None,
              help="On top of the factorization: int8 = onnxruntime's dynamic int8 of every MatMul (per channel) "
                   "and of the embedding Gathers; int4 = 4-bit weight-only blocks (MatMulNBits), for decoders.")
@click.option("--pooled", is_flag=True, help="Encoders: add a mean-pooled `sentence_embedding` output.")
@fuse_option
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
def export(checkpoint, out, opset, dtype, quantize, pooled, fuse, force):
    """Export a compressed CHECKPOINT to ONNX (each factorized layer stays two MatMuls)."""
    exit_cleanly_on_sigterm()
    r = export_checkpoint(checkpoint, out, ExportConfig(opset=opset, dtype=dtype, quantize=quantize, pooled=pooled,
                                                        fuse=fuse), force)
    click.echo(f"wrote {out}: {r.task}, {r.precision}, opset {r.opset}, {r.onnx_bytes / 1e6:.2f} MB ONNX "
               f"in {r.seconds:.1f}s; {r.check.summary()}")


@click.command()
@click.argument("checkpoint", type=PATH)
@click.argument("onnx_dir", type=PATH)
@ep_options
@session_options
@click.option("--batch", type=int, default=4, show_default=True, help="Sentences / sequences compared.")
@click.option("--seq-len", type=int, default=64, show_default=True, help="Tokens per sequence.")
@click.option("--new-tokens", type=int, default=16, show_default=True, help="Decoders: greedy tokens compared.")
@json_option
def verify(checkpoint, onnx_dir, eps, allow_cpu_fallback, threads, inter_threads, opt_level, batch, seq_len,
           new_tokens, json_out, force):
    """Parity of ONNX_DIR against the compressed PyTorch CHECKPOINT; exit code 1 on failure."""
    if json_out is not None:
        check_output_file(json_out, force)
    providers = resolve_eps(tuple(eps), allow_cpu_fallback)
    if "auto" in eps and CUDA not in providers:
        providers.append(CUDA)  # reported as skipped, with the reason
    cfg = ParityConfig(batch=batch, seq_len=seq_len, new_tokens=new_tokens, eps=tuple(providers),
                       session=SessionConfig(threads, inter_threads, opt_level))
    console = out_console()
    try:
        report = verify_export(checkpoint, onnx_dir, cfg)
    except ParityError as exc:
        print_parity(console, exc.report)
        _write_json(json_out, exc.report.to_json(), force)
        raise
    print_parity(console, report)
    _write_json(json_out, report.to_json(), force)


@click.command()
@click.argument("onnx_dir", type=PATH)
@click.option("--dense", "dense_dir", type=PATH, default=None,
              help="Dense ONNX folder to compare with (default: export the checkpoint's source model now).")
@click.option("--no-dense", is_flag=True, help="Measure the compressed model only.")
@ep_options
@session_options
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--seq-len", type=int, default=128, show_default=True,
              help="Encoders: tokens per sequence; decoders: prompt length (prefill) and KV-cache length (decode).")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed runs first.")
@click.option("--runs", type=int, default=50, show_default=True, help="Timed runs.")
@click.option("--per-node", is_flag=True, help="Also profile kernels (separate session) and sum them per layer.")
@json_option
def profile(onnx_dir, dense_dir, no_dense, eps, allow_cpu_fallback, threads, inter_threads, opt_level, batch,
            seq_len, warmup, runs, per_node, json_out, force):
    """Latency and memory of ONNX_DIR under onnxruntime, dense and compressed side by side."""
    if json_out is not None:
        check_output_file(json_out, force)
    cfg = ProfileConfig(batch=batch, seq_len=seq_len, warmup=warmup, runs=runs,
                        eps=tuple(resolve_eps(tuple(eps), allow_cpu_fallback)),
                        session=SessionConfig(threads, inter_threads, opt_level), per_node=per_node)
    report = profile_against_dense(onnx_dir, dense_dir, cfg, with_dense=not no_dense, reporter=reporter(quiet=True))
    print_profile(out_console(), report)
    _write_json(json_out, report.to_json(), force)


@click.command()
@click.argument("onnx_dir", type=PATH, required=False)
@click.option("--checkpoint", type=PATH, default=None,
              help="Compressed checkpoint the ONNX came from (default: the one recorded at export).")
@click.option("--out", "out", type=PATH, default=None, help="Bundle folder to write (BUNDLE.tar.gz beside it).")
@click.option("--parity-report", type=PATH, default=None, help="JSON from `verify --json` (default: verify now).")
@click.option("--profile-report", type=PATH, default=None, help="JSON from `profile --json` (default: profile now).")
@click.option("--runs", type=int, default=20, show_default=True, help="Timed runs when profiling now.")
@click.option("--sign", "sign_key", type=PATH, default=None, metavar="KEY",
              help="Sign the manifest with this Ed25519 private key (PEM, e.g. from `openssl genpkey -algorithm "
                   "ed25519`): writes manifest.sig.")
@click.option("--check", "check_path", type=PATH, default=None,
              help="Instead of packing: check BUNDLE (folder or .tar.gz) exactly against its manifest.")
@click.option("--verify-key", type=PATH, default=None, metavar="KEY",
              help="With --check: also require manifest.sig to verify with this Ed25519 public key (PEM).")
@click.option("--force", is_flag=True, help="Replace the bundle folder and archive if they exist.")
def pack(onnx_dir, checkpoint, out, parity_report, profile_report, runs, sign_key, check_path, verify_key, force):
    """Pack ONNX_DIR into a deployable bundle, or check one with --check BUNDLE."""
    exit_cleanly_on_sigterm()
    if check_path is not None:
        result = verify_bundle(check_path, verify_key)
        m = result.manifest
        keep = m["compression"].get("keep_actual")
        signature = (f"signature verified with {verify_key}" if result.verified
                     else f"signed ({SIGNATURE}), signature not verified: give --verify-key" if result.signed
                     else "not signed: this proves the files match the manifest, not who wrote it")
        click.echo(f"ok: {check_path} — {len(m['files'])} files match manifest.json "
                   f"(schema {m['schema_version']}, {m['source'].get('model', '?')}, {m['compression']['method']}"
                   f"{f' keep {keep:.3f}' if keep is not None else ''}); {signature}")
        return
    if verify_key is not None:
        raise click.UsageError("--verify-key goes with --check BUNDLE")
    if onnx_dir is None or out is None:
        raise click.UsageError("pack needs ONNX_DIR and --out (or --check BUNDLE)")
    bundle = pack_export(onnx_dir, out, checkpoint, parity_report, profile_report, runs, force, sign_key)
    click.echo(f"wrote {bundle} and {bundle}.tar.gz" + (f", signed ({SIGNATURE})" if sign_key else ""))


@click.command()
@click.argument("bundle", type=PATH)
@click.option("--compare", "compare", multiple=True, type=PATH, metavar="BUNDLE",
              help="Another bundle (other keep or device) to place on the trade-off chart. Repeatable.")
def report(bundle, compare):
    """Write BUNDLE/report.html: summary and budgets, per-layer and spectrum charts, latency, quality."""
    path = write_report(bundle, compare)
    click.echo(f"wrote {path} ({path.stat().st_size:,} bytes)")
