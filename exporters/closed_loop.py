"""The closed loop on this machine: plan → build → export → measure → re-aim, until every budget is met."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from edgesvd.costmodel import CostModel
from edgesvd.errors import BudgetError
from edgesvd.planner import LayerImportance, Receipt, plan_ranks, resolve_limits
from edgesvd.profiles import Budget, Profile
from edgesvd.reporting import SILENT, Reporter
from edgesvd.units import fmt_quantity

MEASURABLE = ("model_bytes", "peak_memory", "latency_p50", "latency_p90")


def missed_budgets(limits: dict[str, float], measured: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Budgets the measurement misses: key → (measured, limit)."""
    return {k: (measured[k], lim) for k, lim in limits.items() if k in measured and measured[k] > lim}


def retargeted(plan_limits: dict[str, float], limits: dict[str, float], measured: dict[str, float],
               bounds: dict[str, tuple] | None = None, margin: float = 0.97, relax_above: float = 0.10,
               max_relax: float = 1.25, binding: str | None = None) -> dict[str, float]:
    """Planning limits for the next plan, from what the last one measured.

    Latency: a missed budget is re-aimed by the ratio the measurement was off (limit ÷ measured,
    times `margin`: timing errors are relative); one met with more than `relax_above` headroom
    is re-aimed up (by at most `max_relax`), since a plan far under its budget gave quality away —
    unless the plan is bound by another budget (`binding`), which relaxing it would not change.
    Once one planning limit has met and another missed, the next is their midpoint (bisection;
    `bounds` holds key → (highest that met, lowest that missed) across calls). A missed size is
    lowered by 1.25 × the overshoot: what its estimate misses (graph structure, runtime memory)
    is an additive constant. Everything else keeps its planning limit.
    """
    bounds = {} if bounds is None else bounds
    out = dict(plan_limits)
    for key, limit in limits.items():
        if key not in measured:
            continue
        value, aim = measured[key], plan_limits[key]
        if not key.startswith("latency"):
            if value > limit:
                out[key] = aim - 1.25 * (value - limit)
            continue
        lo, hi = bounds.get(key, (None, None))
        if value > limit:
            hi = aim if hi is None else min(hi, aim)
        elif (limit - value) / limit > relax_above and binding in (None, key):
            lo = aim if lo is None else max(lo, aim)
        else:
            continue
        bounds[key] = (lo, hi)
        if lo is not None and hi is not None:
            out[key] = (lo + hi) / 2
        else:
            out[key] = aim * min(limit / value * margin, max_relax)
    return out


@dataclass
class Attempt:
    """One plan tried: its receipt, model, folder and what it measured (estimated when not local)."""

    plan: int
    receipt: Receipt
    model: nn.Module | None
    folder: Path
    values: dict[str, float]
    report: dict | None
    met: bool
    limits: dict[str, float]
    dense: dict[str, float]



def closed_loop(p: Profile, layers: list[LayerImportance], cost: CostModel, limits: dict[str, float],
                dense_values: dict[str, float], build: Callable[[Receipt, Path, int], nn.Module], folder: Path,
                measure: Callable[[Path, bool], tuple[dict, dict | None, dict]] | None, max_plans: int,
                reporter: Reporter = SILENT) -> tuple[Attempt, list[dict]]:
    """Plan, build, measure (on this machine), re-aim, at most `max_plans` times; keep the plan that
    meets every measured budget with the most importance. Without `measure` (a device not at hand)
    one plan, values estimated.

    `build(receipt, where, attempt)` writes `where/checkpoint` and `where/onnx` and returns the
    model; `measure(onnx_dir, with_dense)` returns the export's values, the dense model's measured
    beside it (when asked) and the profiling report. The chosen plan's checkpoint/ and onnx/ end up
    in `folder`. Returns it (with the limits and dense values it was judged by: relative budgets
    follow the dense model measured beside each plan) and the history."""
    local = measure is not None
    relative = any(b.relative is not None for b in p.budgets.values())
    plan_limits, history, attempts, seen, bounds = dict(limits), [], [], [], {}
    if local:  # sizes: what the estimate leaves out of the dense model (graph, runtime) is a constant
        estimated = cost.dense()
        for key in ("model_bytes", "peak_memory"):
            if key in plan_limits:
                plan_limits[key] -= dense_values[key] - estimated[key]
    for attempt in range(1, max_plans + 1):
        try:
            receipt = plan_ranks(layers, cost, {k: Budget(k, absolute=v) for k, v in plan_limits.items()})
            for _ in range(20):  # a missed plan re-aimed to the same ranks: keep re-aiming until they change
                if receipt.ranks() not in seen or not history or not history[-1]["missed"]:
                    break
                plan_limits = retargeted(plan_limits, limits, attempts[-1].values, bounds)
                receipt = plan_ranks(layers, cost, {k: Budget(k, absolute=v) for k, v in plan_limits.items()})
        except BudgetError as exc:
            if not history:
                extra = f" (dense model measured here: p50 {dense_values['latency_p50']:.2f} ms)" if local else ""
                raise BudgetError(f"{exc}{extra}") from exc
            raise BudgetError(f"{p.name}: plan {attempt - 1} missed on this machine ({history[-1]['missed']}) "
                              f"and no tighter plan exists: {exc}") from exc
        if receipt.ranks() in seen:  # re-aiming changed nothing: the loop has converged
            break
        seen.append(receipt.ranks())
        receipt.budgets = [replace(b, budget=str(p.budgets[b.key])) for b in receipt.budgets]
        reporter.step(f"{p.name}: plan {attempt} "
            f"({sum(r.rank is not None for r in receipt.rows)}/{len(receipt.rows)} layers factorized, "
            f"estimated p50 {receipt.totals['latency_p50']:.2f} ms, {receipt.totals['model_bytes'] / 1e6:.2f} MB)")
        where = folder / f"plan{attempt}"
        model = build(receipt, where, attempt)
        if not local:  # estimated, like the dense values the limits came from (the bundle's size is shown apart)
            values = dict(receipt.totals)
            attempts.append(Attempt(attempt, receipt, model, where, values, None, True, dict(limits),
                                     dict(dense_values)))
            break
        values, dense_now, report = measure(where / "onnx", relative)
        values.setdefault("peak_memory", receipt.totals["peak_memory"])  # GPU: estimated (see _values)
        if dense_now is not None:  # relative budgets against the dense model measured just now
            dense_values.update(dense_now)
            limits = resolve_limits(p.budgets, dense_values)
        missed = missed_budgets(limits, values)
        history.append({"plan": attempt, "estimated": {k: receipt.totals[k] for k in limits},
                        "measured": {k: values[k] for k in limits}, "limits": dict(limits),
                        "importance_kept": receipt.importance_kept,
                        "missed": "; ".join(f"{k} {fmt_quantity(k, v)} > {fmt_quantity(k, lim)}" for k, (v, lim) in missed.items())})
        best = max((a for a in attempts if a.met), key=lambda a: a.receipt.importance_kept, default=None)
        keep_model = not missed and (best is None or receipt.importance_kept > best.receipt.importance_kept)
        attempts.append(Attempt(attempt, receipt, model if keep_model else None, where, values, report, not missed,
                                 dict(limits), dict(dense_values)))
        nxt = retargeted(plan_limits, limits, values, bounds, binding=receipt.binding)
        if nxt == plan_limits or attempt == max_plans:
            break
        reporter.info(f"[yellow]{p.name}: plan {attempt} "
            + (f"misses its budget on this machine ({history[-1]['missed']}); tightening"
               if missed else "meets its budgets with room to spare; relaxing") + " and re-planning[/yellow]")
        plan_limits = nxt
    met = [a for a in attempts if a.met]
    if not met:
        raise BudgetError(f"{p.name}: budget not met on this machine after {len(attempts)} plans "
                          f"(last: {history[-1]['missed']}); relax the budget or raise --max-plans")
    chosen = max(met, key=lambda a: a.receipt.importance_kept)
    for sub in ("checkpoint", "onnx"):
        (chosen.folder / sub).replace(folder / sub)
    for a in attempts:
        shutil.rmtree(a.folder, ignore_errors=True)
    if history:
        history[chosen.plan - 1]["chosen"] = True
    return chosen, history
