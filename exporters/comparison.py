"""What every device got in one budget run, side by side: the comparison table (JSON, Markdown, terminal)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgesvd.families import TASK_SCORES
from edgesvd.planner import Receipt

from .closed_loop import missed_budgets
from .profiling import CONFIDENCE, WINDOW_QUANTILE

COLUMNS = ["profile", "latency is", "factorized", "ONNX size", "dense p50", "p50", f"p50 ratio [{100 * CONFIDENCE:g}% interval]",
           "importance kept", "quality", "binds", "budgets met", "plans"]


@dataclass
class DeviceResult:
    """What one profile got: its bundle, plan, measured or estimated values and its quality (the
    --eval task score first when there is one, then the proxy)."""

    profile: str
    device: str
    latency_source: str
    bundle: Path
    onnx_bytes: int
    receipt: Receipt
    values: dict[str, float]          # model_bytes, peak_memory, latency_p50, latency_p90 (measured when local)
    measured: bool
    limits: dict[str, float]
    iterations: int
    history: list[dict] = field(default_factory=list)
    quality: dict[str, float] = field(default_factory=dict)
    parity_ok: bool = True
    verdicts: dict[str, dict] = field(default_factory=dict)  # budget → Verdict.to_json() (interval, pairs, load)

    def to_json(self) -> dict:
        d = asdict(self)
        d["bundle"] = str(self.bundle)
        d["receipt"] = self.receipt.to_json()
        return d


def _ratio_cell(r: DeviceResult) -> str:
    """The p50 ratio; with its interval where a paired measurement judged a relative budget."""
    point = f"{r.values['latency_p50'] / r.receipt.dense['latency_p50']:.2f}"
    v = r.verdicts.get("latency_p50")
    if not v or not v.get("pairs") or "dense" not in v["budget"]:
        return point
    i = v["interval"]
    shown = lambda x: "open" if x is None else f"{x:.3f}"
    return f"{i['estimate']:.3f} [{shown(i['low'])}, {shown(i['high'])}], {100 * WINDOW_QUANTILE:g}% ≤ {shown(v['bound'])}"


def _met_cell(r: DeviceResult) -> str:
    """yes / NO, or with verdicts: certified, not met or cannot certify, with pairs and load."""
    if not r.verdicts:
        return "yes" if not missed_budgets(r.limits, r.values) else "NO"
    statuses = {v["status"] for v in r.verdicts.values()}
    word = "yes" if statuses == {"met"} else "cannot certify" if "cannot certify" in statuses else "NO"
    paired = [v for v in r.verdicts.values() if v.get("pairs")]
    if paired:
        word += f" ({paired[0]['pairs']} pairs, load {paired[0]['load_average']:.1f})"
    return word


def comparison_rows(results: list[DeviceResult]) -> list[list[str]]:
    """Rows of the per-device comparison: size, latency (with its label and, where paired, the
    ratio's interval), quality, binding budget, whether the budgets are certified."""
    rows = []
    for r in results:
        q = next(iter(r.quality.items()), ("", float("nan")))
        rows.append([r.profile, r.receipt.latency_source if not r.measured else "measured",
                     f"{sum(x.rank is not None for x in r.receipt.rows)}/{len(r.receipt.rows)}",
                     f"{r.onnx_bytes / 1e6:.2f} MB", f"{r.receipt.dense['latency_p50']:.2f} ms",
                     f"{r.values['latency_p50']:.2f} ms", _ratio_cell(r),
                     f"{r.receipt.importance_kept:.3f}", f"{q[1]:.4f}", r.receipt.binding or "-",
                     _met_cell(r), str(r.iterations)])
    return rows


def quality_legend(results: list[DeviceResult]) -> str:
    """What the comparison's quality column is: the --eval task score, else the proxy."""
    name = next((k for r in results for k in r.quality), "")
    if name in TASK_SCORES.values():
        return f"quality: {name.replace('_', ' ')} of the compressed PyTorch model on the --eval file"
    return f"quality: {name.replace('_', ' ')} on held-out calibration text (a proxy; --eval FILE gives a task score)"


def comparison_markdown(results: list[DeviceResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(results)]
    return "\n".join(lines) + "\n\n" + quality_legend(results)
