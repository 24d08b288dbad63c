"""A bundle's self-contained HTML report (report.html): summary, budgets, charts, latency, quality."""

from __future__ import annotations

import base64
import html
import os
import tempfile
from pathlib import Path

from edgesvd.units import fmt_bytes

from . import plots
from .manifest import record_file, refuse_signed
from .report_data import BudgetRow, ReportInputs, read_bundle

REPORT_FILE = "report.html"

_CSS = """
:root { color-scheme: light dark; --ink: #1d1d1d; --muted: #5c5c5c; --rule: #d0d0d0; --bg: #ffffff;
        --card: #f6f6f6; --pass: #1b5e20; --fail: #b71c1c; --warn: #6d4c00; }
@media (prefers-color-scheme: dark) {
  :root { --ink: #e8e8e8; --muted: #b0b0b0; --rule: #4a4a4a; --bg: #161616; --card: #222222;
          --pass: #81c784; --fail: #ef9a9a; --warn: #ffd54f; }
}
@media print { :root { --ink: #000; --muted: #333; --bg: #fff; --card: #fff; --rule: #999; }
               section { break-inside: avoid-page; } }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--ink);
       background: var(--bg); margin: 0 auto; max-width: 1180px; padding: 1.2rem 1.6rem 3rem; line-height: 1.45; }
h1 { font-size: 1.55rem; margin: 0 0 .2rem; }
h2 { font-size: 1.15rem; border-bottom: 1px solid var(--rule); padding-bottom: .2rem; margin-top: 2rem; }
p.sub, .note { color: var(--muted); }
.note { font-size: .9rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border-bottom: 1px solid var(--rule); padding: .3rem .7rem; text-align: left; vertical-align: top; }
th { font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { width: 14rem; }
.badge { display: inline-block; font-weight: 700; padding: 0 .45rem; border: 1.5px solid currentColor;
         border-radius: 3px; font-size: .85rem; letter-spacing: .03em; }
.pass { color: var(--pass); } .fail { color: var(--fail); } .warn { color: var(--warn); }
.missing { border-left: 4px solid var(--rule); background: var(--card); padding: .5rem .8rem; }
figure { margin: .6rem 0 1rem; }
/* Charts are drawn on white so that they read the same on a dark page and in print. */
figure img { max-width: 100%; height: auto; background: #fff; border: 1px solid var(--rule); border-radius: 4px;
             padding: 4px; }
figcaption { font-size: .85rem; color: var(--muted); }
details summary { cursor: pointer; color: var(--muted); }
footer { margin-top: 2.5rem; font-size: .8rem; color: var(--muted); }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    return f"{value:.2f} ms" if unit == "ms" else fmt_bytes(value)


def _badge(verdict: str) -> str:
    cls = {"pass": "pass", "passed": "pass", "fail": "fail", "failed": "fail"}.get(verdict, "warn")
    return f'<span class="badge {cls}">{_e(verdict.upper())}</span>'


def _img(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _missing(text: str) -> str:
    return f'<p class="missing">{_e(text)}</p>'


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset(), cls: str = "") -> str:
    """Cells are already-escaped HTML; columns in `numeric` are right-aligned."""
    head = "".join(f'<th class="num">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>"
                   for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _budget_rows(budgets: list[BudgetRow]) -> list[list[str]]:
    rows = []
    for b in budgets:
        rows.append([_e(b.label) + (" <em>(binds)</em>" if b.binding else ""), _e(b.budget),
                     _e(fmt_value(b.limit, b.unit)), _e(fmt_value(b.planned, b.unit)),
                     _e(fmt_value(b.measured, b.unit)), _badge(b.verdict)])
    return rows


def summary_section(r: ReportInputs) -> str:
    factorized = sum(l.rank is not None for l in r.layers)
    keep = (f"{r.keep_actual:.3f} (requested {r.keep_requested})" if r.keep_actual is not None else "–")
    size = fmt_bytes(r.onnx_bytes)
    if r.dense_onnx_bytes:
        size = f"{fmt_bytes(r.dense_onnx_bytes)} dense → {size} compressed ({r.onnx_bytes / r.dense_onnx_bytes:.1%})"
    verdict = ("not checked" if r.parity_ok is None else "pass" if r.parity_ok else "fail")
    kv = [("Model", f"{Path(r.model).name or r.model} — {r.family} ({r.model_type})"
                    + (f", from {r.model}" if "/" in r.model else "")),
          ("Device profile", f"{r.profile} — {r.device}" if r.profile else "none — packed without a device profile"),
          ("Method", r.method), ("Keep (targeted parameters after ÷ before)", keep),
          ("Layers factorized", f"{factorized} of {len(r.layers)} targeted" if r.layers else "–"),
          ("ONNX", f"{r.precision}, opset {r.opset}"), ("Bundle bytes (ONNX graph + data)", size)]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in kv)
    rows += f"<tr><th>Parity verdict</th><td>{_badge(verdict)}</td></tr>"
    vs_dense = [q for q in r.quality if q.kind == "task score" or q.kind.startswith("quality proxy")]
    quality = "; ".join(f"{q.metric} {q.value:.4f} ({q.kind.split(':')[0]})" for q in vs_dense)
    rows += f"<tr><th>Quality vs dense</th><td>{_e(quality or 'not measured (no evaluation set, no budget run)')}</td></tr>"
    out = [f'<section id="summary"><h2>Summary</h2><table class="kv"><tbody>{rows}</tbody></table>']
    if r.parity:
        out.append(_table(["parity per execution provider", "status", "detail"],
                          [[_e(p.provider), _badge(p.status), _e(p.detail)] for p in r.parity]))
    out.append('<h3 id="budgets">Budgets vs measured</h3>')
    if r.budgets:
        out.append(_table(["budget", "as written", "limit", "planned (estimated)", "measured", "verdict"],
                          _budget_rows(r.budgets), numeric={2, 3, 4}))
        out += [f'<p class="note">{_e(n)}</p>' for n in r.budget_notes]
    else:
        out.append(_missing("No budgets: this bundle was packed without a device profile, so there is nothing to "
                            "pass or fail. The keep above was given directly."))
    out.append("</section>")
    return "\n".join(out)


def layers_section(r: ReportInputs) -> str:
    out = ['<section id="layers"><h2>Per-layer ranks and bytes</h2>']
    if not r.layers:
        out.append(_missing("This bundle does not record its targeted layers (no edgesvd section in config.json)."))
        return "\n".join(out + ["</section>"])
    png = plots.layer_chart(r.layers, r.precision)
    out.append(_img(png, "per-layer rank kept vs break-even rank, and weight bytes",
                    "Left: rank kept per targeted layer; the orange tick is the break-even rank, at or above which "
                    "a factorized layer is larger and slower than the dense one. Right: weight bytes of each layer, "
                    "dense (grey) and as shipped (black)."))
    rows = [[_e(l.name), f"{l.out_features}×{l.in_features}", "dense" if l.rank is None else str(l.rank),
             f"{l.break_even:.0f}", _e(fmt_bytes(l.bytes_dense)), _e(fmt_bytes(l.bytes_after))] for l in r.layers]
    before, after = sum(l.bytes_dense for l in r.layers), sum(l.bytes_after for l in r.layers)
    rows.append(["<strong>total</strong>", "", "", "", _e(fmt_bytes(before)), _e(fmt_bytes(after))])
    out.append("<details><summary>Per-layer table</summary>"
               + _table(["layer", "out×in", "rank", "break-even", "bytes dense", "bytes after"], rows,
                        numeric={2, 3, 4, 5}) + "</details>")
    return "\n".join(out + ["</section>"])


def spectrum_section(r: ReportInputs) -> str:
    out = ['<section id="spectrum"><h2>Spectrum: singular values and learned importance</h2>']
    if not r.spectra:
        out.append(_missing("This bundle carries no spectrum of its targeted layers (reports/spectrum.safetensors "
                            "is absent or lists no layer, e.g. when every layer was left dense), so no singular "
                            "values can be shown."))
        return "\n".join(out + ["</section>"])
    learned = any(s.scores is not None for s in r.spectra)
    caption = ("Singular values of the activation-whitened weight (log scale); filled points are kept, hollow "
               "points pruned.")
    if learned:
        caption += " Orange crosses: the learned importance score of each component (1 = unchanged)."
    out.append(_img(plots.spectrum_chart(r.spectra), "singular values with kept components marked", caption))
    if not learned:
        out.append(f'<p class="note">The method <code>{_e(r.method)}</code> learns no importance scores: the '
                   "chart shows singular values and the kept components only.</p>")
    return "\n".join(out + ["</section>"])


def latency_section(r: ReportInputs) -> str:
    out = ['<section id="latency"><h2>Latency: dense vs compressed</h2>']
    if not r.latency:
        out.append(_missing("This bundle holds no latency measurement or estimate."))
        return "\n".join(out + ["</section>"])
    out.append(_img(plots.latency_chart(r.latency, r.latency_shape), "latency dense vs compressed",
                    "Bars: p50; whisker: p50 to p90; diamond: p99. Hatched bars are estimates, not measurements."))
    rows = [[_e(x.provider), _e(x.mode), _e(x.model), f"{x.p50_ms:.2f}",
             "–" if x.p90_ms is None else f"{x.p90_ms:.2f}", "–" if x.p99_ms is None else f"{x.p99_ms:.2f}",
             _e(x.source) if x.source == "measured" else f"<strong>{_e(x.source)}</strong>"] for x in r.latency]
    out.append(_table(["execution provider", "mode", "model", "p50 ms", "p90 ms", "p99 ms", "source"], rows,
                      numeric={3, 4, 5}))
    if r.comparisons:
        rows = [[_e(c["provider"]), _e(c["mode"]), f"{c['speedup']:.2f}×", f"{c['flop_bound_speedup']:.2f}×",
                 f"{c['fraction_of_bound']:.0%}" if c.get("fraction_of_bound") is not None else "–"]
                for c in r.comparisons]
        out.append(_table(["execution provider", "mode", "measured speedup (p50)", "FLOP-bound speedup",
                           "of bound"], rows, numeric={2, 3, 4}))
    return "\n".join(out + ["</section>"])


def _closeness(q) -> str:
    """1 − value for agreement metrics near 1, where six decimals would all read 1.000000."""
    return f"1 − value = {1 - q.value:.1e}" if q.kind.startswith("parity") and 0.999999 < q.value < 1 else ""


def quality_section(r: ReportInputs) -> str:
    out = ['<section id="quality"><h2>Quality</h2>']
    if not r.quality:
        out.append(_missing("No quality metric was computed for this bundle."))
        return "\n".join(out + ["</section>"])
    rows = [[_e(q.metric), f"{q.value:.6f}", _e(q.kind), _e(q.detail or _closeness(q))] for q in r.quality]
    out.append(_table(["metric", "value", "measured as", "detail"], rows, numeric={1}))
    if not any(q.kind == "task score" for q in r.quality):
        out.append('<p class="note">No evaluation set was given, so there is no task score. Parity is the '
                   "agreement of the ONNX model with the compressed PyTorch model; a quality proxy, where present, "
                   "compares the compressed model with the dense one.</p>")
    return "\n".join(out + ["</section>"])


def pareto_section(r: ReportInputs) -> str:
    baselines = any(p.kind == "baseline" for p in r.pareto)
    title = "Trade-off: edgesvd against what users already have" if baselines else "Trade-off across keeps and devices"
    out = [f'<section id="pareto"><h2>{title}</h2>']
    if len(r.pareto) < 2:
        out.append(_missing("Not applicable: " + (r.pareto_note or "this bundle comes from a single keep on a "
                            "single device, so there is no trade-off to chart (run several keeps or devices and "
                            "pass the other bundles with `edgesvd report BUNDLE --compare OTHER`, or compare "
                            "with onnxruntime's own quantization: `edgesvd run --compare-quantized`).")))
        return "\n".join(out + ["</section>"])
    caption = (f"{r.pareto[0].quality_name} against p50 latency and model size; hollow points have estimated "
               "latency. The grey step joins the Pareto-optimal variants.")
    if baselines:
        caption += (" Grey squares: the dense model through onnxruntime's own optimizer and quantization (what "
                    "users have without edgesvd); blue circles: edgesvd.")
    out.append(_img(plots.pareto_chart(r.pareto), "quality vs latency and vs size", caption))
    if r.pareto_verdict:
        out.append("<ul>" + "".join(f"<li>{_e(line)}</li>" for line in r.pareto_verdict) + "</ul>")
    if baselines:
        shapes = list(dict.fromkeys(k for p in r.pareto for k in p.latencies))
        rows = [[_e(p.label), _e(p.kind), _e(fmt_bytes(p.bytes)), f"{p.quality:.4f}",
                 *(f"{p.latencies[s]:.2f}" if s in p.latencies else "–" for s in shapes)] for p in r.pareto]
        out.append(_table(["model", "kind", "ONNX bytes", r.pareto[0].quality_name,
                           *(f"p50 {s} ms" for s in shapes)], rows, numeric=set(range(2, 4 + len(shapes)))))
    if r.pareto_source:
        out.append(f'<p class="note">{_e(r.pareto_source)}</p>')
    return "\n".join(out + ["</section>"])


def render_html(r: ReportInputs) -> str:
    """The whole page as one string: inline CSS, charts as base64 PNG, no scripts, fonts or links out."""
    versions = ", ".join(f"{k} {v}" for k, v in r.versions.items())
    body = [summary_section(r), layers_section(r), spectrum_section(r), latency_section(r), quality_section(r),
            pareto_section(r)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            # No network: images are data: URIs, styles inline; this policy makes a browser refuse anything else.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>edgesvd report — {_e(Path(r.model).name or r.model)}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>edgesvd report — {_e(Path(r.model).name or r.model)}</h1>"
            f"<p class=\"sub\">bundle <code>{_e('/'.join(r.bundle.resolve().parts[-3:]))}</code> · created {_e(r.created)}</p></header>"
            + "\n".join(body)
            + f"<footer>Made by edgesvd from this bundle's manifest.json and reports/. {_e(versions)}</footer>"
            "</body></html>\n")


def write_report(bundle: str | os.PathLike, compare: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Write `bundle`/report.html from the bundle's contents (atomically) and return its path;
    `compare`: other bundles (other keeps or devices) to chart the trade-off against."""
    bundle = Path(bundle)
    refuse_signed(bundle)
    page = render_html(read_bundle(bundle, tuple(compare)))
    out = bundle / REPORT_FILE
    fd, tmp = tempfile.mkstemp(prefix=".report.", suffix=".html", dir=bundle)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    record_file(bundle, REPORT_FILE)
    return out
