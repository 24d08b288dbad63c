"""`edgesvd run`: the whole job in one command."""

from __future__ import annotations

from pathlib import Path

import click

from edgesvd.exporters.baselines import CLOCKS, CompareConfig
from edgesvd.exporters.deploy import DeployConfig, RunConfig
from edgesvd.exporters.deploy import run as run_job
from edgesvd.exporters.export import ExportConfig
from edgesvd.exporters.providers import SessionConfig, resolve_eps
from edgesvd.exporters.quantize import QUANTIZATIONS
from edgesvd.profiles import parse_budget_overrides

from .options import (
    PATH,
    budget_option,
    calibration,
    calibration_options,
    ep_options,
    exit_cleanly_on_sigterm,
    form_option,
    fuse_option,
    out_console,
    reporter,
    session_options,
)
from .printing import print_devices, print_summary


@click.command()
@click.argument("model", default="minilm", required=False)
@click.option("--method", default=None,
              help="Compression method (default: the best available, edgesvd.compression.DEFAULT_METHOD).")
@click.option("--keep", type=float, default=0.5, show_default=True, help="Targeted parameters kept, in (0, 1].")
@click.option("--rank-multiple", type=int, default=8, show_default=True, help="Round ranks to this multiple.")
@form_option
@calibration_options
@click.option("--out-root", type=PATH, default=Path("edgesvd-out"), show_default=True,
              help="Everything goes to OUT_ROOT/<model>/.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--quantize", type=click.Choice(QUANTIZATIONS), default=None,
              help="int8 (dynamic, MatMuls and embedding Gathers) or int4 (weight-only blocks), as `export`. "
                   "int4 builds plain factors and the learned method fine-tunes them through the 4-bit grid "
                   "(compress --quantize-aware int4).")
@fuse_option
@ep_options
@session_options
@click.option("--runs", type=int, default=30, show_default=True, help="Timed onnxruntime runs per model.")
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size when profiling.")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Sequence length when profiling.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where compression runs (torch).")
@click.option("--profile", "profile_refs", multiple=True, metavar="NAME|PATH",
              help="Plan per-layer ranks for this hardware profile's budgets instead of --keep (built-in name "
                   "or .toml path). Repeatable: one importance pass, one bundle per device.")
@budget_option
@click.option("--max-plans", type=int, default=3, show_default=True,
              help="With --profile on this machine: plans measured while searching for the one that certifies "
                   "every budget with the most importance.")
@click.option("--max-pairs", type=int, default=960, show_default=True,
              help="With --profile on this machine: most dense/compressed run pairs timed per plan before a "
                   "latency budget is declared impossible to certify (a quarter first, doubling while undecided).")
@click.option("--eval", "eval_file", type=PATH, default=None, metavar="FILE",
              help="Also score dense and compressed PyTorch models on a task: STS-B Spearman for encoders "
                   "(an STS-B tab-separated file, e.g. sts-dev.csv), perplexity for decoders (a text file). "
                   "Shown in the summary, recorded in the manifest and the report.")
@click.option("--compare-quantized", is_flag=True,
              help="Also build what users have without edgesvd (dense + onnxruntime's optimizer, int8, and 4-bit "
                   "for decoders) and edgesvd's model at each precision, and measure them together: bytes, score "
                   "(--eval task score, else agreement with the dense model), latency interleaved in one process. "
                   "Recorded in the manifest, charted in the report.")
@click.option("--compare-clock", type=click.Choice(CLOCKS), default="wall", show_default=True,
              help="Clock of the comparison: wall (the session's threads), or cpu (one thread, its CPU time: "
                   "stable on a machine shared with other work).")
@click.option("--force", is_flag=True, help="Replace OUT_ROOT/<model>/ if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(model, method, keep, rank_multiple, form, calib, calib_samples, calib_len, calib_temperature, seed, out_root, dtype, quantize, fuse, eps,
        allow_cpu_fallback, threads, inter_threads, opt_level, runs, batch, seq_len, device, profile_refs,
        budget_items, max_plans, max_pairs, eval_file, compare_quantized, compare_clock, force, quiet):
    """The whole job: compress MODEL, export, verify, profile dense vs compressed, pack a bundle.

    With --profile / --budget: ranks per device from its budgets (--budget alone means --profile host).
    """
    exit_cleanly_on_sigterm()
    deploy = DeployConfig(export=ExportConfig(dtype=dtype, quantize=quantize, pooled=True, fuse=fuse),
                          eps=tuple(resolve_eps(tuple(eps), allow_cpu_fallback)),
                          session=SessionConfig(threads, inter_threads, opt_level), runs=runs, batch=batch,
                          seq_len=seq_len, max_plans=max_plans, max_pairs=max_pairs, eval_file=eval_file,
                          compare=CompareConfig(runs=max(runs, 3), seq_len=seq_len, clock=compare_clock,
                                                session=SessionConfig(threads, inter_threads, opt_level))
                          if compare_quantized else None)
    cfg = RunConfig(model=model, method=method, keep=keep, rank_multiple=rank_multiple, form=form,
                    calibration=calibration(calib, calib_samples, calib_len, calib_temperature, seed), device=device,
                    profiles=tuple(profile_refs), budgets=parse_budget_overrides(budget_items) or None,
                    out_root=out_root, force=force, deploy=deploy)
    result = run_job(cfg, reporter(quiet))
    console = out_console()
    if result.summary is not None:
        print_summary(console, result.summary)
    else:
        print_devices(console, result.devices)
