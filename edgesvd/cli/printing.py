"""Tables and lines the commands print: receipts, parity, latency, run summaries, comparisons, checkpoints."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgesvd.exporters.comparison import COLUMNS, comparison_rows, quality_legend
from edgesvd.inspect import CheckpointSummary
from edgesvd.planner import Receipt
from edgesvd.profiles import BUDGET_LABELS
from edgesvd.units import fmt_bytes, fmt_int, fmt_quantity


def _short(provider: str) -> str:
    return provider.replace("ExecutionProvider", "")


def print_checkpoint(console: Console, checkpoint: Path, s: CheckpointSummary) -> None:
    """Per-layer table of a checkpoint: shape, rank, break-even, parameters, bytes (+ where the budget went)."""
    record, rows = s.record, s.rows
    table = Table(title=f"{checkpoint} — method {record.method}, keep {record.keep_actual:.3f} "
                        f"(requested {record.keep_requested})")
    energy = any(r.energy_kept is not None for r in rows)  # spectrum saved: show where the budget went
    scores = any(r.mean_score is not None for r in rows)
    cols = ["layer", "shape", "rank", "break-even", "params before", "params after", "bytes after"]
    cols += ["σ² kept"] * energy + ["mean score"] * scores
    for col in cols:
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in rows:
        extra = [f"{row.energy_kept:.1%}" if row.energy_kept is not None else ""] * energy
        extra += [f"{row.mean_score:.2f}" if row.mean_score is not None else ""] * scores
        table.add_row(row.name, f"{row.shape[0]}×{row.shape[1]}", "dense" if row.rank is None else str(row.rank),
                      f"{row.break_even:.0f}", fmt_int(row.params_before), fmt_int(row.params_after),
                      fmt_bytes(row.bytes_after), *extra)
    before, after = sum(r.params_before for r in rows), sum(r.params_after for r in rows)
    table.add_row("[bold]total", "", f"{sum(r.rank is not None for r in rows)}/{len(rows)} low-rank", "",
                  fmt_int(before), fmt_int(after), fmt_bytes(4 * after), *([""] * (energy + scores)),
                  end_section=True)
    console.print(table)
    console.print(f"weights: {fmt_bytes(s.weight_bytes)}; targeted keep {after / before:.3f}")


def print_receipt(console: Console, receipt: Receipt, per_layer: bool = True) -> None:
    """The budget receipt: per layer rank, bytes, time; each budget with headroom; which binds."""
    if per_layer:
        table = Table(title=f"budget receipt — {receipt.profile} (latency {receipt.latency_source})")
        for col in ("layer", "shape", "rank", "bytes", f"ms ({receipt.latency_source})", "importance kept"):
            table.add_column(col, justify="left" if col == "layer" else "right")
        for row in receipt.rows:
            table.add_row(row.name, f"{row.shape[0]}×{row.shape[1]}", "dense" if row.rank is None else str(row.rank),
                          fmt_bytes(row.bytes), f"{row.ms:.3f}", f"{row.importance_kept:.3f}")
        console.print(table)
    t, dn = receipt.totals, receipt.dense
    console.print(f"{escape('[' + receipt.profile + ']')} model {fmt_bytes(dn['model_bytes'])} → {fmt_bytes(t['model_bytes'])}, "
                  f"p50 {dn['latency_p50']:.2f} → {t['latency_p50']:.2f} ms (planned, latency {receipt.latency_source}), "
                  f"peak memory {fmt_bytes(t['peak_memory'])}, importance kept {receipt.importance_kept:.3f}")
    for line in receipt.summary().splitlines():
        console.print(f"  {escape(line)}")
    for note in receipt.notes:
        console.print(f"  note: {escape(note)}")


def print_parity(console: Console, report) -> None:
    """The parity report as a table: one row per EP and output."""
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
    console.print(table)
    for r in report.results:
        for failure in r.failures:
            console.print(f"[red]FAIL[/red] {_short(r.provider)}: {failure}")


def print_profile(console: Console, report) -> None:
    """Latency per model/EP/mode, then dense → compressed ratios beside the FLOP bound."""
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
    console.print(table)
    if report.comparisons:
        ratio = Table(title="dense → compressed")
        for col in ("EP", "mode", "dense p50 ms", "compressed p50 ms", "speedup", "FLOP ratio", "FLOP bound", "of bound"):
            ratio.add_column(col, justify="left" if col in ("EP", "mode") else "right")
        for r in report.comparisons:
            ratio.add_row(_short(r["provider"]), r["mode"], f"{r['dense_p50_ms']:.2f}", f"{r['compressed_p50_ms']:.2f}",
                          f"{r['speedup']:.2f}×", f"{r['flop_ratio']:.3f}", f"{r['flop_bound_speedup']:.2f}×",
                          f"{r['fraction_of_bound']:.0%}")
        console.print(ratio)
    profiled = [m for m in report.measurements if m.per_layer_ms]
    if profiled:
        per = Table(title="per-layer kernel time (ms per run, onnxruntime profiler)", min_width=64)
        per.add_column("block")
        for m in profiled:
            per.add_column(f"{m.model} {_short(m.provider)}", justify="right")
        blocks = list(dict.fromkeys(b for m in profiled for b in m.per_layer_ms))
        for b in blocks:
            per.add_row(b, *(f"{m.per_layer_ms.get(b, 0.0):.3f}" for m in profiled))
        console.print(per)


def print_summary(console: Console, s) -> None:
    """The closing table of `edgesvd run`."""
    table = Table(title=f"edgesvd run — {s.model}, method {s.method}, keep {s.keep}")
    for col in ("", "dense", "compressed", "ratio"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row("parameters", fmt_int(s.params_dense), fmt_int(s.params_compressed),
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
    console.print(table)
    if s.baselines:
        print_baselines(console, s.baselines)
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in s.seconds.items())
    console.print(f"wrote {s.out} ({steps})")
    console.print(f"report: {s.bundle / 'report.html'}")


def plan_line(h: dict) -> str:
    """One plan of a budget run: keep, estimated vs measured latency, each budget's verdict."""
    parts = [f"plan {h['plan']}: keep {h['keep']:.3f}" if "keep" in h else f"plan {h['plan']}"]
    lat = h.get("latency")
    if lat:
        m = lat["measured_ratio"]
        parts.append(f"p50 estimated {lat['estimated_ratio']:.3f} × dense, measured {m['estimate']:.3f} "
                     f"[{_bound(m['low'])}, {_bound(m['high'])}] ({lat['pairs']} pairs, load average "
                     f"{lat['load_average']:.2f}; estimate {100 * lat['estimate_error']:+.0f}%)")
    for key, v in (h.get("verdicts") or {}).items():
        i, label = v["interval"], BUDGET_LABELS[key]
        if not v.get("pairs"):
            parts.append(f"{label} {fmt_quantity(key, i['estimate'])} of {fmt_quantity(key, v['limit'])}: {v['status']}")
            continue
        unit = "× dense" if "dense" in v["budget"] else " ms"
        shown = "" if lat and key == "latency_p50" and unit == "× dense" else (
            f" {i['estimate']:.3f} [{_bound(i['low'])}, {_bound(i['high'])}],")
        parts.append(f"{label}{shown} {100 * v['window_quantile']:g}% of windows ≤ {_bound(v['bound'])}{unit}, "
                     f"limit {v['limit']:.3f}{unit}: {v['status']}")
    return "; ".join(parts) + ("  ← chosen" if h.get("chosen") else "")


def _bound(value) -> str:
    return "open" if value is None else f"{value:.3f}"


def print_baselines(console: Console, c: dict) -> None:
    """`run --compare-quantized`: every variant's bytes, score and speedup over the dense model."""
    table = Table(title=f"what users already have vs edgesvd — {c['clock']} clock, {c['runs']} interleaved rounds, "
                        f"load average {c['load_average'][0]:.1f} → {c['load_average'][-1]:.1f}")
    for col in ("model", "ONNX bytes", c["score_name"].replace("_", " "),
                *(f"{s} p50 ms (× dense)" for s in c["shapes"]), "dominates"):
        table.add_column(col, justify="left" if col in ("model", "dominates") else "right")
    for p in c["points"]:
        style = "bold" if p["kind"] == "edgesvd" else None
        table.add_row(p["label"], fmt_bytes(p["onnx_bytes"]), f"{p['score']:.4f}",
                      *(f"{p['latency_ms'][s]:.2f} ({p['speedup'][s][0]:.2f}×)" for s in c["shapes"]),
                      ", ".join(p["dominates"]) or "-", style=style)
    console.print(table)
    console.print(f"score: {c['score_source']}; dominance: no larger, faster at every shape, score within "
                  f"{c['tolerance']}")
    for line in c["verdict"]:
        console.print(f"  {line}")


def print_devices(console: Console, results) -> None:
    """A budget run's closing lines: each device's receipt and plans, then the comparison table."""
    for r in results:
        print_receipt(console, r.receipt, per_layer=False)
        for h in r.history:
            console.print(f"  {escape(plan_line(h))}")
    table = Table(title=f"edgesvd run — one importance pass, {len(results)} device(s)")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("profile", "latency is", "binds") else "right")
    for row in comparison_rows(results):
        table.add_row(*row)
    console.print(table)
    console.print(f"{quality_legend(results)}; bundles: {', '.join(str(r.bundle) for r in results)}")
    console.print(f"reports: {', '.join(str(r.bundle / 'report.html') for r in results)}")
