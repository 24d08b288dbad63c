"""The closed loop on this machine: plan → build → export → measure → search, until every budget is certified."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from edgesvd.costmodel import CostModel
from edgesvd.errors import BudgetError
from edgesvd.planner import LayerImportance, Receipt, plan_ranks, resolve_limits, smallest_achievable
from edgesvd.profiles import BUDGET_LABELS, Budget, Profile
from edgesvd.reporting import SILENT, Reporter

from .budgets import MET, UNDECIDED, PlanMeasurement, plan_keep
from .profiling import WINDOW_QUANTILE

MEASURABLE = ("model_bytes", "peak_memory", "latency_p50", "latency_p90")
FIRST_AIM = 0.96      # the first plan aims this far inside a latency limit: its interval must fit too
CLOSE_ENOUGH = 0.03   # a certified plan whose upper bound is this close to its limit ends the search
STEP_MARGIN = 0.01    # a re-aimed plan aims this much inside what the measured error suggests
MAX_RELAX = 1.25      # a plan far inside its limit is re-aimed up by at most this factor
MAX_TIGHTEN = 1.5     # ... and one beyond it down by at most this one (an open interval is "far beyond")
# What a size estimate leaves out of the dense export is nearly constant, not exactly: each factorized
# layer adds graph nodes and names (a few hundred bytes). Sizes are aimed this far inside their limit
# so a plan at the limit does not miss it by those bytes (stories260K: 0.26 % over, a wasted plan).
SIZE_MARGIN = 0.005


def size_offsets(estimated_dense: dict[str, float], measured_dense: dict[str, float]) -> dict[str, float]:
    """Per size (model bytes, peak memory): what the estimate leaves out of the measured dense model
    (the ONNX graph, a tied table stored twice, the runtime), which plans are aimed and shown with."""
    return {k: measured_dense[k] - estimated_dense[k] for k in ("model_bytes", "peak_memory")
            if k in measured_dense and k in estimated_dense}


def missed_budgets(limits: dict[str, float], measured: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Budgets whose point values miss: key → (measured, limit)."""
    return {k: (measured[k], lim) for k, lim in limits.items() if k in measured and measured[k] > lim}


@dataclass
class Bracket:
    """One latency budget's search: the loosest planning aim whose plan was certified (`met`) and
    the tightest whose plan missed or could not be certified (`missed`)."""

    met: float | None = None
    missed: float | None = None

    def record(self, aim: float, certified: bool) -> None:
        if certified:
            self.met = aim if self.met is None else max(self.met, aim)
        else:
            self.missed = aim if self.missed is None else min(self.missed, aim)

    def next_aim(self, aim: float, use: float, may_relax: bool) -> float | None:
        """The next planning aim after a plan at `aim` whose measured upper bound was `use` × its
        limit: the midpoint once both sides are known (bisection); before that, the aim corrected
        by the measured error (up by at most MAX_RELAX when the plan was far inside). None: stay."""
        if use <= 1.0 and (1.0 - use <= CLOSE_ENOUGH or not may_relax):
            return None
        if self.met is not None and self.missed is not None:
            return (self.met + self.missed) / 2
        return aim * min(max((1.0 - STEP_MARGIN) / use, 1 / MAX_TIGHTEN), MAX_RELAX)


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
    measurement: PlanMeasurement | None = None
    verdicts: dict = field(default_factory=dict)


def _plan(layers, cost: CostModel, plan_limits: dict[str, float]) -> Receipt:
    return plan_ranks(layers, cost, {k: Budget(k, absolute=v) for k, v in plan_limits.items()})


def _history_row(attempt: int, receipt: Receipt, m: PlanMeasurement, limits: dict, plan_limits: dict,
                 cost: CostModel) -> dict:
    """What the manifest and the terminal show of one plan: aims, estimates, measurements, verdicts."""
    row = {"plan": attempt, "aim": {k: plan_limits[k] for k in limits},
           "estimated": {k: receipt.totals[k] for k in limits}, "measured": {k: m.values[k] for k in limits},
           "limits": dict(limits), "importance_kept": receipt.importance_kept, "keep": plan_keep(receipt),
           "verdicts": {k: v.to_json() for k, v in m.verdicts.items()},
           "missed": "; ".join(str(v) for v in m.verdicts.values() if v.status != MET)}
    if m.pairs is not None:
        est = receipt.totals["latency_p50"] / cost.dense()["latency_p50"]
        ratio = m.pairs.ratio()
        row["latency"] = {"estimated_ratio": est, "measured_ratio": {**ratio.to_json(), "bound": m.pairs.bound()},
                          "pairs": m.pairs.pairs,
                          "load_average": m.pairs.load, "dense_p50_ms": m.dense["latency_p50"],
                          "estimated_ms_at_that_dense": est * m.dense["latency_p50"],
                          "estimate_error": est / ratio.estimate - 1.0}
    return row


def closed_loop(p: Profile, layers: list[LayerImportance], cost: CostModel, limits: dict[str, float],
                dense_values: dict[str, float], build: Callable[[Receipt, Path, int], nn.Module], folder: Path,
                measure: Callable[[Path, dict[str, float]], PlanMeasurement] | None, max_plans: int,
                reporter: Reporter = SILENT) -> tuple[Attempt, list[dict]]:
    """Plan, build, measure (on this machine), search, at most `max_plans` times; keep the plan that
    every budget certifies with the most importance. Without `measure` (a device not at hand) one
    plan, values estimated.

    The search: each latency budget has a planning aim (the cost model's ms), first FIRST_AIM of
    its limit. A plan is certified when the upper bound of its measured interval is within the
    limit; the aims of certified and uncertified plans bracket the answer, and once both are
    known the next aim is their midpoint (bisection on the measured ratio); until then the aim is
    corrected by how far the upper bound fell from the limit. The search stops at a certified
    plan within CLOSE_ENOUGH of its limit, when a plan would repeat, or after `max_plans`. A
    missed size is lowered by 1.25 × the overshoot (what its estimate misses is nearly a constant;
    sizes are aimed SIZE_MARGIN inside their limit).

    `build(receipt, where, attempt)` writes `where/checkpoint` and `where/onnx` and returns the
    model; `measure(onnx_dir, limits)` measures the export beside the dense one and judges every
    budget. The chosen plan's checkpoint/ and onnx/ end up in `folder`. Returns it (with the
    limits and dense values it was judged by: relative budgets follow the dense model measured
    beside each plan) and the history."""
    local = measure is not None
    plan_limits, history, attempts, seen, dead_end = dict(limits), [], [], {}, ""
    brackets = {k: Bracket() for k in limits if k.startswith("latency")}
    if local:  # sizes: what the estimate leaves out of the dense model (graph, runtime) is a constant
        for key, offset in size_offsets(cost.dense(), dense_values).items():
            if key in plan_limits:
                plan_limits[key] -= offset + SIZE_MARGIN * limits[key]
        for key in brackets:
            plan_limits[key] = limits[key] * FIRST_AIM
        try:
            _plan(layers, cost, plan_limits)
        except BudgetError:  # the margin alone is out of reach (a limit near the smallest plan): aim at the limit
            plan_limits.update({key: limits[key] for key in brackets})

    def next_limits(after: Attempt, aims: dict[str, float]) -> dict[str, float] | None:
        """Planning limits after `after` (planned at `aims`); None when the search has converged."""
        nxt, changed = dict(aims), False
        floor = smallest_achievable(layers, cost, p.rank_multiple)  # below it no plan exists: aim there instead
        for key, v in after.verdicts.items():
            if key in brackets:
                aim = brackets[key].next_aim(aims[key], v.use, after.receipt.binding in (None, key))
            elif v.status != MET:  # a size: lower its aim by 1.25 × the overshoot
                aim = aims[key] - 1.25 * (v.interval.estimate - v.limit)
            else:
                continue
            if aim is not None:
                aim = max(aim, floor[key])
                if abs(aim - aims[key]) > 1e-9 * aims[key]:
                    nxt[key], changed = aim, True
        return nxt if changed else None

    for attempt in range(1, max_plans + 1):
        try:
            receipt = _plan(layers, cost, plan_limits)
            for _ in range(20):  # an aim that gives ranks already measured: their verdicts move the bracket
                ranks = tuple(receipt.ranks().items())
                if ranks not in seen:
                    break
                before = attempts[seen[ranks]]
                for key, v in before.verdicts.items():
                    if key in brackets:
                        brackets[key].record(plan_limits[key], v.status == MET)
                nxt = next_limits(before, plan_limits)
                if nxt is None:
                    break
                plan_limits = nxt
                receipt = _plan(layers, cost, plan_limits)
        except BudgetError as exc:
            if not history:
                extra = f" (dense model measured here: p50 {dense_values['latency_p50']:.2f} ms)" if local else ""
                raise BudgetError(f"{exc}{extra}") from exc
            dead_end = f"; no tighter plan exists: {exc}"  # the search ends; a certified plan may already exist
            break
        ranks = tuple(receipt.ranks().items())
        if ranks in seen:  # the search converged on plans already measured
            break
        seen[ranks] = len(attempts)
        receipt.budgets = [replace(b, budget=str(p.budgets[b.key])) for b in receipt.budgets]
        reporter.step(f"{p.name}: plan {attempt} "
                      f"({sum(r.rank is not None for r in receipt.rows)}/{len(receipt.rows)} layers factorized, "
                      f"keep {plan_keep(receipt):.3f}, estimated p50 {receipt.totals['latency_p50']:.2f} ms = "
                      f"{receipt.totals['latency_p50'] / cost.dense()['latency_p50']:.3f} × dense, "
                      f"{receipt.totals['model_bytes'] / 1e6:.2f} MB)")
        where = folder / f"plan{attempt}"
        model = build(receipt, where, attempt)
        if not local:  # estimated, like the dense values the limits came from (the bundle's size is shown apart)
            attempts.append(Attempt(attempt, receipt, model, where, dict(receipt.totals), None, True, dict(limits),
                                    dict(dense_values)))
            break
        m = measure(where / "onnx", limits)
        m.values.setdefault("peak_memory", receipt.totals["peak_memory"])  # GPU: estimated (see budgets._values)
        dense_values.update(m.dense)  # relative budgets: against the dense model measured just now
        limits = resolve_limits(p.budgets, dense_values)
        history.append(_history_row(attempt, receipt, m, limits, plan_limits, cost))
        best = max((a for a in attempts if a.met), key=_worth, default=None)
        keep_model = m.met and (best is None or _worth_of(receipt) > _worth(best))
        current = Attempt(attempt, receipt, model if keep_model else None, where, m.values, m.report, m.met,
                          dict(limits), dict(dense_values), m, m.verdicts)
        attempts.append(current)
        for v in m.verdicts.values():
            reporter.info(f"{p.name}: plan {attempt}: {v}")
        for key, v in m.verdicts.items():
            if key in brackets:
                brackets[key].record(plan_limits[key], v.status == MET)
        nxt = next_limits(current, plan_limits)
        if nxt is None or attempt == max_plans:
            break
        reporter.info(f"[yellow]{p.name}: plan {attempt} "
                      + ("is certified with room to spare; relaxing" if m.met else
                         "is not certified; tightening") + " and planning again[/yellow]")
        plan_limits = nxt
    met = [a for a in attempts if a.met]
    if not met:
        raise BudgetError(_failure(p, attempts, history) + dead_end)
    chosen = max(met, key=_worth)
    for sub in ("checkpoint", "onnx"):
        (chosen.folder / sub).replace(folder / sub)
    for a in attempts:
        shutil.rmtree(a.folder, ignore_errors=True)
    if history:
        history[chosen.plan - 1]["chosen"] = True
    return chosen, history


def _worth_of(receipt: Receipt) -> tuple[float, float]:
    """What a plan is worth: the importance it keeps, then (on ties: importance learned down to a
    smaller keep is flat beyond it) the parameters it keeps."""
    return round(receipt.importance_kept, 6), plan_keep(receipt)


def _worth(a: Attempt) -> tuple[float, float]:
    return _worth_of(a.receipt)


def _failure(p: Profile, attempts: list[Attempt], history: list[dict]) -> str:
    """Why no plan can be claimed: a budget that could not be certified (the measurement spread
    and the load said, of the plan that came closest to being certified), else the last miss."""
    undecided = [(a, v) for a in attempts for v in a.verdicts.values() if v.status == UNDECIDED]
    if undecided:
        a, v = min(undecided, key=lambda av: av[1].use)
        bound = f"{v.bound:.3f}" if math.isfinite(v.bound) else "open"
        return (f"{p.name}: cannot certify {BUDGET_LABELS[v.key]} ≤ {v.budget} on this machine: measurement spread "
                f"{100 * v.spread:.1f}% (load average {v.load_average:.2f}) after {v.pairs} pairs (closest of {len(attempts)} "
                f"plans measured: plan {a.plan}, "
                f"median {v.interval}, {100 * WINDOW_QUANTILE:g}% of windows ≤ {bound}, limit {v.limit:g}); measure "
                "on a quieter machine, raise --max-pairs or --max-plans, or relax the budget")
    return (f"{p.name}: budget not met on this machine after {len(attempts)} plans (last: {history[-1]['missed']}); "
            "relax the budget or raise --max-plans")
