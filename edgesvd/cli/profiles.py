"""`edgesvd profiles list|show`, `plan` and `calibrate-device`: hardware profiles and budgets."""

from __future__ import annotations

import click
from rich.table import Table

from edgesvd.calibration import CalibrationConfig
from edgesvd.errors import ConfigError, DeviceError
from edgesvd.exporters.budgets import preview_plans
from edgesvd.exporters.calibrate_device import calibrate
from edgesvd.exporters.microbench import cache_dir, refresh_caches
from edgesvd.outputs import check_output_file
from edgesvd.profiles import Profile, builtin_names, load_profile, parse_budget_overrides
from edgesvd.units import fmt_bytes

from .options import PATH, budget_option, out_console, reporter
from .printing import print_receipt


def _latency_source(p: Profile) -> str:
    return "measured" if p.device.measure else "calibrated" if p.measured else "estimated"


def _budgets_text(p: Profile) -> str:
    return ", ".join(f"{k}≤{b}" for k, b in p.budgets.items()) or "none"


@click.group("profiles")
def profiles() -> None:
    """Hardware profiles: devices, runtimes, workloads and budgets."""


@profiles.command("list")
def list_profiles() -> None:
    """The built-in profiles (use NAME with --profile, or give a .toml path of your own)."""
    table = Table(title="built-in hardware profiles")
    for col in ("name", "device", "provider", "precision", "workload", "budgets", "rank ×", "latency"):
        table.add_column(col)
    for name in builtin_names():
        p = load_profile(name, measure_host=False)
        w = p.workload
        table.add_row(p.name, p.device.name if not p.device.measure else "this machine", p.runtime.execution_provider,
                      p.runtime.precision, f"batch {w.batch} × seq {w.sequence_length}", _budgets_text(p),
                      str(p.rank_multiple), _latency_source(p))
    out_console().print(table)


@profiles.command("show")
@click.argument("name")
def show_profile(name: str) -> None:
    """Every field of profile NAME (a built-in name or a .toml path); `host` is measured now."""
    p = load_profile(name)
    d, r, w = p.device, p.runtime, p.workload
    table = Table(title=f"profile {p.name} — {p.path}", show_header=False)
    table.add_column("key")
    table.add_column("value")
    rows = [
        ("description", p.description), ("device.name", d.name), ("device.kind", d.kind),
        ("device.cores", str(d.cores)), ("device.memory", fmt_bytes(d.memory_bytes)),
        ("device.peak_gflops", f"{d.peak_gflops:g}" if d.peak_gflops else "-"),
        ("device.memory_bandwidth_gbs", f"{d.bandwidth_gbs:g}" if d.bandwidth_gbs else "-"),
        ("device.source", d.source), ("runtime.execution_provider", r.execution_provider),
        ("runtime.threads", str(r.threads or "all cores")), ("runtime.precision", r.precision),
        ("runtime.efficiency", f"{r.efficiency:g}"), ("runtime.op_overhead_us", f"{r.op_overhead_us:g}"),
        ("runtime.overhead", fmt_bytes(r.overhead_bytes)),
        ("workload", f"batch {w.batch}, sequence {w.sequence_length}"
                     + (f", prompt {w.prompt_length}, new tokens {w.new_tokens} (decoders)" if w.prompt_length else "")),
        ("rank_multiple", str(p.rank_multiple)),
    ]
    rows += [(f"budgets.{k}", str(b)) for k, b in p.budgets.items()] or [("budgets", "none")]
    rows.append(("latency", _latency_source(p)))
    if p.measured:
        m = p.measured
        rows.append(("measured", f"{len(m.matmul)} MatMul timings on {m.host} ({m.execution_provider}, "
                                 f"onnxruntime {m.onnxruntime}, {m.date})"))
    for key, value in rows:
        table.add_row(key, value)
    out_console().print(table)


@click.command("plan")
@click.argument("model", default="minilm", required=False)
@click.option("--profile", "profile_refs", multiple=True, default=("host",), show_default=True,
              help="Built-in profile name or .toml path. Repeatable: one plan per device.")
@budget_option
@click.option("--calib-samples", type=int, default=32, show_default=True, help="Calibration sequences for XᵀX.")
@click.option("--calib-len", type=int, default=128, show_default=True, help="Tokens per calibration sequence.")
@click.option("--per-layer/--totals-only", default=True, show_default=True, help="Print the per-layer receipt.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def plan(model, profile_refs, budget_items, calib_samples, calib_len, per_layer, quiet):
    """Plan per-layer ranks of MODEL for each --profile's budgets and print the budget receipt.

    Importance is the whitened singular spectrum on calibration data; nothing is trained or
    written (a preview: `run --profile` learns importance by default and its ranks differ).
    Infeasible budgets fail here, with the smallest achievable size and latency.
    """
    receipts = preview_plans(model, profile_refs, parse_budget_overrides(budget_items),
                             CalibrationConfig(num_sequences=calib_samples, seq_len=calib_len), reporter(quiet))
    console = out_console()
    for receipt in receipts:
        print_receipt(console, receipt, per_layer)


@click.command("calibrate-device")
@click.option("--out", type=PATH, default=None, help="Profile file (.toml) to write.")
@click.option("--refresh", is_flag=True,
              help="Rebuild this machine's micro-benchmark cache instead (every layer timing `run --profile host` "
                   "cached), dropping sets whose repeated timings disagree.")
@click.option("--name", default=None, help="Profile name (default: the file's stem).")
@click.option("--provider", type=click.Choice(["CPUExecutionProvider", "CUDAExecutionProvider"]),
              default="CPUExecutionProvider", show_default=True)
@click.option("--threads", type=int, default=0, show_default=True, help="Intra-op threads (0: all cores).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--seq", type=int, default=128, show_default=True)
@click.option("--sizes", default="64,128,256,384,512,768,1024,1536,2048,3072,4096", show_default=True,
              help="Matrix sizes timed as k and n (every pair).")
@click.option("--runs", type=int, default=20, show_default=True, help="Timed runs per shape.")
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
def calibrate_device(out, refresh, name, provider, threads, precision, batch, seq, sizes, runs, force):
    """Time MatMuls on this device under onnxruntime and write a profile with the measured table
    (--out), or rebuild the micro-benchmark cache the `host` profile plans from (--refresh).

    On a board without edgesvd, copy exporters/calibrate_device.py there and run it with Python:
    it needs only onnxruntime and numpy.
    """
    if refresh:
        if out is not None:
            raise ConfigError("--refresh rebuilds the micro-benchmark cache and writes no profile: drop --out")
        summaries = refresh_caches(reporter())
        if not summaries:
            click.echo(f"nothing to refresh: no micro-benchmark cache of this machine in {cache_dir()}")
        for s in summaries:
            state = "rebuilt" if s["kept"] else "removed (its timings never agreed)"
            click.echo(f"{s['cache']}: {s['entries']} timings {state}; repeated timings disagree by "
                       f"{100 * s['disagreement']:.0f}% at load average {s['load_average']:.2f} ({s['made']})")
        return
    if out is None:
        raise ConfigError("calibrate-device needs --out FILE (or --refresh)")
    check_output_file(out, force)
    try:
        size_list = tuple(int(s) for s in sizes.split(",") if s.strip())
    except ValueError as exc:
        raise ConfigError(f"--sizes must be integers separated by commas, got {sizes!r}") from exc
    if not size_list or min(size_list) < 1 or batch < 1 or seq < 1 or runs < 1:
        raise ConfigError("--sizes, --batch, --seq and --runs must be positive")
    try:
        calibrate(out, name or out.stem.lower().replace(" ", "-"), provider, threads, precision, batch, seq,
                  size_list, runs=runs, log=click.echo)
    except RuntimeError as exc:
        raise DeviceError(str(exc)) from exc
    load_profile(out)  # what was written must load
