"""The report's charts as PNG bytes (matplotlib, Agg): per-layer ranks and bytes, spectra, latency, Pareto."""

from __future__ import annotations

import io
import os
from contextlib import contextmanager

import numpy as np

from .report_data import LatencyRow, LayerRow, ParetoPoint, SpectrumRow

# A neutral palette that survives light and dark (inverted) printing and grayscale: near-black ink,
# two greys, one dark blue and one dark orange; shapes and hatching carry the meaning as well.
INK = "#222222"
GREY = "#8a8a8a"
LIGHT = "#d4d4d4"
BLUE = "#1f4e8c"
ORANGE = "#b35806"
DPI = 110
_STYLE = {
    "figure.facecolor": "white", "axes.facecolor": "white", "savefig.facecolor": "white",
    "axes.edgecolor": INK, "axes.labelcolor": INK, "xtick.color": INK, "ytick.color": INK, "text.color": INK,
    "axes.grid": True, "grid.color": "#e6e6e6", "grid.linewidth": 0.6, "axes.axisbelow": True,
    "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold", "legend.fontsize": 8,
    "legend.frameon": True, "legend.framealpha": 0.95, "legend.edgecolor": LIGHT,
    "axes.spines.top": False, "axes.spines.right": False, "hatch.color": INK, "hatch.linewidth": 0.5,
    "font.family": "DejaVu Sans",  # matplotlib's bundled font: identical output on every machine
    "svg.hashsalt": "edgesvd",
}


@contextmanager
def _style():
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        yield


def _subplots(*args, figsize, layout=None, **kwargs):
    """A Figure drawn by the Agg canvas, without pyplot: no display, no global figure registry,
    and the caller's backend is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(*args, **kwargs)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # Fixed metadata: the same inputs give the same bytes (no creation time in the PNG).
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def short_names(names: list[str]) -> list[str]:
    """Layer names without the prefix they all share up to a dot and before any block index
    ('encoder.layer.' in BERT, 'model.layers.' in Llama)."""
    if len(names) < 2:
        return list(names)
    prefix = os.path.commonprefix(names)
    parts = prefix[: prefix.rfind(".") + 1].split(".")[:-1]
    # Never strip a block index ('model.layers.0.'): the reader needs to know which block it is.
    parts = parts[: next((i for i, p in enumerate(parts) if p.isdigit()), len(parts))]
    prefix = "".join(p + "." for p in parts)
    return [n[len(prefix):] or n for n in names]


def _bytes_unit(values: list[float]) -> tuple[float, str]:
    top = max(values, default=0)
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if top >= scale:
            return scale, unit
    return 1.0, "bytes"


def layer_chart(layers: list[LayerRow], precision: str) -> bytes:
    """Two panels per targeted layer: rank kept against the break-even rank, and weight bytes dense
    against compressed. Dense-kept layers show a hatched bar at the break-even rank."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    with _style():
        n = len(layers)
        fig, (ax_r, ax_b) = _subplots(1, 2, sharey=True, figsize=(11, 1.6 + 0.22 * n), layout="constrained")
        y = np.arange(n)
        names = short_names([l.name for l in layers])
        ranks = [l.rank if l.rank is not None else 0 for l in layers]
        ax_r.barh(y, ranks, height=0.7, color=BLUE)
        dense = [i for i, l in enumerate(layers) if l.rank is None]
        if dense:
            ax_r.barh(dense, [layers[i].break_even for i in dense], height=0.7, color="white", edgecolor=GREY,
                      hatch="////")
        ax_r.scatter([l.break_even for l in layers], y, marker="|", s=160, linewidths=2, color=ORANGE, zorder=3)
        ax_r.set_yticks(y, names)
        ax_r.set_ylim(n - 0.5, -0.5)  # first layer on top, no empty margin
        ax_r.set_xlabel("rank (singular components)")
        ax_r.set_title("Rank kept vs break-even rank")
        scale, unit = _bytes_unit([l.bytes_dense for l in layers])
        ax_b.barh(y, [l.bytes_dense / scale for l in layers], height=0.8, color=LIGHT)
        ax_b.barh(y, [l.bytes_after / scale for l in layers], height=0.45, color=INK)
        ax_b.set_xlabel(f"weight bytes at {precision} ({unit}, bias excluded)")
        ax_b.set_title("Weight bytes per layer")
        ax_b.tick_params(axis="y", length=0)
        handles = [Patch(color=BLUE, label="rank kept"),
                   Line2D([], [], marker="|", ls="", ms=12, mew=2, color=ORANGE,
                          label="break-even rank out·in/(out+in)"),
                   *([Patch(facecolor="white", edgecolor=GREY, hatch="////", label="left dense")] if dense else []),
                   Patch(color=LIGHT, label="bytes dense"), Patch(color=INK, label="bytes as shipped")]
        fig.legend(handles=handles, loc="outside upper center", ncol=len(handles))
        return _png(fig)


def spectrum_chart(spectra: list[SpectrumRow]) -> bytes:
    """Per layer: singular values (log scale) with kept components filled, and the learned score of
    every component on a second axis when the method learned scores."""
    from matplotlib.lines import Line2D

    with _style():
        cols = 2 if len(spectra) > 1 else 1
        rows = (len(spectra) + cols - 1) // cols
        fig, axes = _subplots(rows, cols, figsize=(5.6 * cols, 3.4 * rows), squeeze=False)
        names = short_names([s.name for s in spectra])
        for ax, spec, name in zip(axes.flat, spectra, names):
            k = np.arange(1, len(spec.sigma) + 1)
            sigma = np.maximum(spec.sigma, 1e-12)  # log axis: exact zeros drawn at the floor
            ax.plot(k, sigma, color=GREY, lw=1, zorder=1)
            ax.scatter(k[spec.kept], sigma[spec.kept], s=9, color=BLUE, zorder=2)
            ax.scatter(k[~spec.kept], sigma[~spec.kept], s=9, facecolors="white", edgecolors=GREY, lw=0.6, zorder=2)
            ax.set_yscale("log")
            ax.set_xlabel("component (in order of singular value)")
            ax.set_ylabel("singular value σ (whitened)")
            ax.set_title(f"{name}\nkept {int(spec.kept.sum())} of {len(spec.sigma)}", fontsize=9)
            handles = [Line2D([], [], color=GREY, marker="o", mfc=BLUE, mec=BLUE, ms=4, label="σ, kept"),
                       Line2D([], [], color=GREY, marker="o", mfc="white", mec=GREY, ms=4, label="σ, pruned")]
            if spec.scores is not None:
                ax2 = ax.twinx()
                ax2.scatter(k, spec.scores, s=7, marker="x", color=ORANGE, lw=0.8, zorder=3)
                ax2.axhline(1.0, color=ORANGE, lw=0.6, ls=":")
                ax2.set_ylabel("learned importance score s", color=ORANGE)
                ax2.tick_params(axis="y", colors=ORANGE)
                ax2.spines["right"].set_visible(True)
                ax2.grid(False)
                handles.append(Line2D([], [], color=ORANGE, marker="x", ls="", ms=5, label="learned score s"))
            ax.legend(handles=handles, loc="upper right")
        for ax in list(axes.flat)[len(spectra):]:
            ax.set_visible(False)
        fig.tight_layout()
        return _png(fig)


def latency_chart(rows: list[LatencyRow], shape: dict) -> bytes:
    """One panel per execution provider and mode (each on its own scale: prefill and decode differ
    by orders of magnitude): dense vs compressed p50 bars, p90 whiskers, p99 diamonds, measured
    and estimated side by side; estimated bars are hatched and labelled so."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    with _style():
        panels = list(dict.fromkeys((r.provider, r.mode) for r in rows))
        sources = {p: list(dict.fromkeys(r.source for r in rows if (r.provider, r.mode) == p)) for p in panels}
        widths = [max(1.6, 1.5 * len(sources[p])) for p in panels]
        fig, axes = _subplots(1, len(panels), figsize=(sum(widths) + 2.6, 3.9), squeeze=False,
                                 gridspec_kw={"width_ratios": widths}, layout="constrained")
        width = 0.36
        for ax, panel in zip(axes[0], panels):
            for g, source in enumerate(sources[panel]):
                est = source != "measured"
                for j, model in enumerate(("dense", "compressed")):
                    r = next((r for r in rows if ((r.provider, r.mode), r.source, r.model) == (panel, source, model)),
                             None)
                    if r is None:
                        continue
                    x = g + (j - 0.5) * width
                    ax.bar(x, r.p50_ms, width * 0.9, color=LIGHT if model == "dense" else BLUE,
                           edgecolor=INK if est else "none", hatch="///" if est else None, lw=0.6)
                    ax.annotate(f"{r.p50_ms:.3g}", (x, r.p50_ms), xytext=(-7, 2), textcoords="offset points",
                                ha="right" if r.p90_ms is not None else "center", va="bottom", fontsize=7)
                    if r.p90_ms is not None:
                        ax.plot([x, x], [r.p50_ms, r.p90_ms], color=INK, lw=1)
                        ax.plot([x - width * 0.15, x + width * 0.15], [r.p90_ms] * 2, color=INK, lw=1)
                    if r.p99_ms is not None:
                        ax.scatter([x], [r.p99_ms], marker="D", s=14, color=ORANGE, zorder=3)
            ax.set_xticks(range(len(sources[panel])),
                          ["measured" if s == "measured" else "estimated" for s in sources[panel]])
            ax.set_xlim(-0.6, len(sources[panel]) - 0.4)
            ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
            ax.set_title(f"{panel[0].replace('ExecutionProvider', '')} · {panel[1]}")
            ax.set_ylabel("latency per call (ms)")
            ax.grid(axis="x", visible=False)
        desc = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in shape.items() if v is not None)
        fig.suptitle("Latency, dense vs compressed" + (f" ({desc})" if desc else ""), fontsize=10, fontweight="bold")
        handles = [Patch(color=LIGHT, label="dense p50"), Patch(color=BLUE, label="compressed p50"),
                   Line2D([], [], color=INK, lw=1, label="p50 → p90"),
                   Line2D([], [], marker="D", ls="", ms=4, color=ORANGE, label="p99")]
        if any(r.source != "measured" for r in rows):
            handles.append(Patch(facecolor="white", edgecolor=INK, hatch="///", label="estimated (not measured)"))
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles))
        return _png(fig)


def _front(xs: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Indices of the Pareto-optimal points (lower x, higher quality), sorted by x."""
    order = np.argsort(xs, kind="stable")
    best, keep = -np.inf, []
    for i in order:
        if qs[i] > best:
            keep.append(i)
            best = qs[i]
    return np.array(keep, dtype=int)


def pareto_chart(points: list[ParetoPoint]) -> bytes:
    """Quality against latency (one panel per measured shape) and against size for several keeps,
    devices or baselines; the Pareto front over all points joined. edgesvd points are blue
    circles, baselines (what users have without edgesvd) grey squares."""
    from matplotlib.lines import Line2D

    with _style():
        shapes = list(dict.fromkeys(k for p in points for k in p.latencies))
        q = np.array([p.quality for p in points])
        scale, unit = _bytes_unit([p.bytes for p in points])
        panels = ([([p.latencies.get(s) for p in points], f"p50 latency, {s} (ms)", f"Quality vs latency ({s})")
                   for s in shapes] or [([p.latency_ms for p in points], "p50 latency (ms)", "Quality vs latency")])
        panels.append(([p.bytes / scale for p in points], f"model size ({unit})", "Quality vs size"))
        fig, axes = _subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2 if shapes else 3.8), squeeze=False)
        baselines = any(p.kind == "baseline" for p in points)
        for ax, (xs, xlabel, title) in zip(axes[0], panels):
            have = [i for i, x in enumerate(xs) if x is not None]
            if not have:
                ax.text(0.5, 0.5, "no latency recorded", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            x = np.array([xs[i] for i in have], dtype=float)
            qq = q[have]
            front = _front(x, qq)
            ax.step(x[front], qq[front], where="post", color=GREY, lw=1)
            for idx, i in enumerate(have):
                est = points[i].latency_source == "estimated" and "latency" in xlabel
                base = points[i].kind == "baseline"
                color = GREY if base else BLUE
                ax.scatter([x[idx]], [qq[idx]], s=40, marker="s" if base else "o", zorder=3,
                           facecolors="white" if est else color, edgecolors=INK if base else BLUE)
                ax.annotate(points[i].label + (" (est.)" if est else ""), (x[idx], qq[idx]),
                            xytext=(5, 5 - 12 * (idx % 2)), textcoords="offset points", fontsize=7)
            ax.margins(x=0.3, y=0.2)  # room for the labels of the outermost points
            ax.set_xlabel(xlabel)
            ax.set_ylabel(points[0].quality_name)
            ax.ticklabel_format(axis="y", useOffset=False)  # scores near 1 read as scores, not "+1"
            ax.set_title(title)
        handles = [Line2D([], [], color=GREY, lw=1, label="Pareto front"),
                   Line2D([], [], marker="o", ls="", ms=6, color=BLUE, label="edgesvd")]
        if baselines:
            handles.append(Line2D([], [], marker="s", ls="", ms=6, mfc=GREY, mec=INK,
                                  label="baseline (onnxruntime on the dense model)"))
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), bbox_to_anchor=(0.5, -0.02))
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        return _png(fig)
