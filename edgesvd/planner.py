"""Rank choice, in one place: uniform ranks, global selection under a parameter budget, plans that meet a profile's budgets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .costmodel import CostModel, LayerShape, candidate_ranks
from .errors import BudgetError, ConfigError
from .factorize import break_even_rank, dense_or_rank, params_at, rank_for_params
from .profiles import BUDGET_KEYS, BUDGET_LABELS, Budget
from .units import fmt_bytes, fmt_ms


@dataclass(frozen=True)
class LayerImportance:
    """A layer's shape and its per-component importance, most important first (a prefix is kept)."""

    shape: LayerShape
    importance: np.ndarray

    def kept(self, rank: int | None) -> float:
        """Importance kept at `rank` (dense keeps all of it)."""
        return float(self.importance.sum()) if rank is None else float(self.importance[:rank].sum())

    def cost(self, rank: int) -> int:
        """Parameters at `rank`; a rank at or past break-even (or full rank) costs the dense layer."""
        s = self.shape
        rank = dense_or_rank(s.out_features, s.in_features, rank, s.pivoted)
        return params_at(s.out_features, s.in_features, rank, s.pivoted)


# -- rank choice under a parameter budget --------------------------------------------------------
def check_rank_multiple(shapes: dict[str, tuple[int, int]], multiple: int, pivoted: bool = False) -> None:
    """Refuse a rank multiple at or above every layer's break-even rank: every rank is at least one
    multiple, so every layer would stay dense and the "compressed" model would be the dense one."""
    usable = [name for name, (out_f, in_f) in shapes.items()
              if dense_or_rank(out_f, in_f, multiple, pivoted) is not None]
    if shapes and not usable:
        name, (out_f, in_f) = max(shapes.items(), key=lambda kv: break_even_rank(*kv[1], pivoted))
        raise ConfigError(f"rank multiple {multiple} (--rank-multiple) is not below the break-even rank of any "
                          f"targeted layer (the largest is {break_even_rank(out_f, in_f, pivoted):.1f}, {name}, "
                          f"{out_f}×{in_f}): every layer would stay dense; use a smaller multiple")


def round_rank(rank: float, multiple: int) -> int:
    """Nearest multiple of `multiple`, at least one multiple."""
    return max(multiple, int(round(rank / multiple)) * multiple)


def uniform_rank(out_features: int, in_features: int, keep: float, multiple: int = 8,
                 pivoted: bool = False) -> int | None:
    """The rank that keeps `keep` of an out×in layer in its form, rounded; None if the layer stays dense."""
    target = rank_for_params(out_features, in_features, keep * params_at(out_features, in_features, None), pivoted)
    return dense_or_rank(out_features, in_features, round_rank(target, multiple), pivoted)


def _blocks(layer: LayerImportance, multiple: int) -> list[tuple[int, float]]:
    """(rank after the block, summed importance of the block) for consecutive blocks of `multiple`
    components in decreasing importance; the last block may be shorter."""
    imp = layer.importance
    return [(min(start + multiple, len(imp)), float(imp[start:start + multiple].sum()))
            for start in range(0, len(imp), multiple)]


def select_global(layers: list[LayerImportance], target_params: float, multiple: int) -> dict[str, int | None]:
    """Per-layer ranks whose total parameters come closest to `target_params` from below, chosen
    by importance per unit cost across all layers.

    Every layer starts with one block of `multiple` components (a layer is never removed). Then
    blocks are taken greedily by (block importance ÷ added parameters); inside a layer blocks come
    in decreasing importance, so ratios decrease and the greedy choice keeps every layer a prefix.
    A block that would overshoot the budget is skipped (and its layer closed), so smaller blocks of
    other layers can still fill the remainder. A layer whose rank reaches break-even becomes dense
    (None): its last block then costs the remainder up to the dense size.
    """
    by_name = {l.shape.name: l for l in layers}
    blocks = {n: _blocks(l, multiple) for n, l in by_name.items()}
    dense = {n: params_at(l.shape.out_features, l.shape.in_features, None) for n, l in by_name.items()}
    position = {n: 1 for n in by_name}  # number of blocks taken
    rank = {n: blocks[n][0][0] for n in by_name}
    total = sum(by_name[n].cost(rank[n]) for n in rank)
    open_layers = {n for n in rank if len(blocks[n]) > 1 and by_name[n].cost(rank[n]) < dense[n]}
    while open_layers:
        best, best_ratio, best_added = None, -1.0, 0
        for name in sorted(open_layers):  # sorted: ties resolve the same way on every run
            new_rank, importance = blocks[name][position[name]]
            added = by_name[name].cost(new_rank) - by_name[name].cost(rank[name])
            ratio = importance / max(added, 1)
            if ratio > best_ratio:
                best, best_ratio, best_added = name, ratio, added
        if total + best_added > target_params:
            open_layers.discard(best)
            continue
        rank[best] = blocks[best][position[best]][0]
        position[best] += 1
        total += best_added
        if position[best] >= len(blocks[best]) or by_name[best].cost(rank[best]) >= dense[best]:
            open_layers.discard(best)
    return {n: (None if by_name[n].cost(rank[n]) >= dense[n] else rank[n]) for n in rank}


def select_uniform(layers: list[LayerImportance], keep: float, multiple: int) -> dict[str, int | None]:
    """The ablation of select_global: every layer keeps its uniform rank (None stays None), capped
    by the components it has."""
    out = {}
    for l in layers:
        r = uniform_rank(l.shape.out_features, l.shape.in_features, keep, multiple, l.shape.pivoted)
        out[l.shape.name] = None if r is None else min(r, len(l.importance))
    return out


# -- rank choice under a profile's budgets -------------------------------------------------------
@dataclass
class ReceiptRow:
    name: str
    shape: tuple[int, int]
    rank: int | None
    bytes: float
    ms: float
    importance_kept: float
    pivoted: bool = False


@dataclass
class BudgetLine:
    key: str
    budget: str        # as written: '60% of dense', '40.0 MB'
    limit: float       # bytes or ms
    value: float       # planned (estimated) value
    headroom: float    # (limit − value) / limit
    binding: bool = False
    measured: float | None = None


@dataclass
class Receipt:
    """What the plan costs, per layer and in total, against every budget of the profile."""

    profile: str
    latency_source: str          # measured / calibrated / estimated
    rows: list[ReceiptRow]
    budgets: list[BudgetLine]
    totals: dict[str, float]
    dense: dict[str, float]
    importance_kept: float       # mean over layers of the importance share kept
    notes: list[str] = field(default_factory=list)

    @property
    def binding(self) -> str | None:
        return next((b.key for b in self.budgets if b.binding), None)

    def ranks(self) -> dict[str, int | None]:
        return {r.name: r.rank for r in self.rows}

    def to_json(self) -> dict:
        d = asdict(self)
        d["binding"] = self.binding
        return d

    def summary(self) -> str:
        """One line per budget: limit, planned value, headroom; which one binds."""
        if not self.budgets:
            return "no budgets: every layer dense"
        lines = []
        for b in self.budgets:
            unit = fmt_ms if b.key.startswith("latency") else fmt_bytes
            value = (unit(b.value) + f" ({self.latency_source})" if b.key.startswith("latency") else unit(b.value))
            if b.measured is not None:
                value = f"{unit(b.measured)} measured (plan {unit(b.value)})"
            lines.append(f"{BUDGET_LABELS[b.key]}: {value} of {unit(b.limit)} ({b.budget}), headroom "
                         f"{100 * b.headroom:.1f}%{'  ← binds' if b.binding else ''}")
        return "\n".join(lines)


@dataclass
class _Ladder:
    """The states one layer can take, in order: candidate ranks, then dense."""

    layer: LayerImportance
    states: list[int | None]
    bytes: list[float]
    ms: list[float]
    pos: int = 0

    @property
    def state(self) -> int | None:
        return self.states[self.pos]


def resolve_limits(budgets: dict[str, Budget], dense: dict[str, float]) -> dict[str, float]:
    """Absolute limits (bytes, ms) from the profile's budgets and the dense model's values."""
    return {k: b.limit(dense[k]) for k, b in budgets.items()}


def _ladders(layers: list[LayerImportance], cost: CostModel, multiple: int) -> list[_Ladder]:
    out = []
    for li in layers:
        states: list[int | None] = [r for r in candidate_ranks(li.shape, multiple) if r <= len(li.importance)]
        states.append(None)
        out.append(_Ladder(li, states, [cost.layer_bytes(li.shape, s) for s in states],
                           [cost.layer_ms(li.shape, s) for s in states]))
    return out


def smallest_achievable(layers: list[LayerImportance], cost: CostModel, multiple: int) -> dict[str, float]:
    """The least of every budgeted quantity any plan can reach (each minimised on its own)."""
    ladders = _ladders(layers, cost, multiple)
    low_bytes = cost.quantities(sum(min(l.bytes) for l in ladders), sum(l.ms[int(np.argmin(l.bytes))] for l in ladders))
    low_ms = cost.quantities(sum(l.bytes[int(np.argmin(l.ms))] for l in ladders), sum(min(l.ms) for l in ladders))
    return {"model_bytes": low_bytes["model_bytes"], "peak_memory": low_bytes["peak_memory"],
            "latency_p50": low_ms["latency_p50"], "latency_p90": low_ms["latency_p90"]}


def _infeasible_message(profile: str, limits: dict[str, float], low: dict[str, float], source: str) -> str:
    asked = []
    for k, lim in limits.items():
        unit = fmt_ms if k.startswith("latency") else fmt_bytes
        asked.append(f"{BUDGET_LABELS[k]} ≤ {unit(lim)}{' (smallest achievable ' + unit(low[k]) + ')' if low[k] > lim else ''}")
    return (f"budget infeasible on {profile}: {'; '.join(asked)}; smallest achievable size "
            f"{fmt_bytes(low['model_bytes'])}, latency {fmt_ms(low['latency_p50'])} ({source})")


def _fits(cost: CostModel, limits: dict[str, float], sum_b: float, sum_t: float) -> bool:
    q = cost.quantities(sum_b, sum_t)
    return all(q[k] <= lim * (1 + 1e-12) for k, lim in limits.items())


def _violation(cost: CostModel, limits: dict[str, float], sum_b: float, sum_t: float) -> float:
    q = cost.quantities(sum_b, sum_t)
    return sum(max(q[k] - lim, 0.0) / lim for k, lim in limits.items())


def _repair(ladders: list[_Ladder], cost: CostModel, limits: dict[str, float], sum_b: float, sum_t: float
            ) -> tuple[float, float]:
    """From the smallest ranks, which can break a latency budget where a small factorized layer is
    slower than dense, move one layer at a time to whichever of its states cuts the total budget
    violation most, until every budget is met or no move helps."""
    while True:
        current = _violation(cost, limits, sum_b, sum_t)
        if current == 0.0:
            return sum_b, sum_t
        best = None
        for lad in ladders:
            for j in range(len(lad.states)):
                b, t = sum_b + lad.bytes[j] - lad.bytes[lad.pos], sum_t + lad.ms[j] - lad.ms[lad.pos]
                v = _violation(cost, limits, b, t)
                if v < current - 1e-15 and (best is None or v < best[0]):
                    best = (v, lad, j, b, t)
        if best is None:
            return sum_b, sum_t
        _, lad, lad.pos, sum_b, sum_t = best


def plan_ranks(layers: list[LayerImportance], cost: CostModel, budgets: dict[str, Budget] | None = None,
               multiple: int | None = None) -> Receipt:
    """Per-layer ranks meeting every budget at once, keeping the most importance.

    Greedy by marginal importance per marginal cost: every layer starts at its smallest rank;
    each step raises the layer whose next rank (or dense, once the next rank would reach
    break-even) adds the most importance per unit of budget it uses, where each budget's use is
    measured against its slack. A step that would break any budget is not taken. Afterwards a
    factorized layer that is not faster than its dense form goes dense if the budgets allow.
    Raises BudgetError (before any training) when the budgets cannot all be met.
    """
    profile = cost.profile
    budgets = profile.budgets if budgets is None else budgets
    multiple = multiple or profile.rank_multiple
    dense = cost.dense()
    limits = resolve_limits(budgets, dense)
    ladders = _ladders(layers, cost, multiple)
    if not limits:  # nothing to meet: keep everything
        for lad in ladders:
            lad.pos = len(lad.states) - 1
    low = smallest_achievable(layers, cost, multiple)
    if any(low[k] > lim for k, lim in limits.items()):
        raise BudgetError(_infeasible_message(profile.name, limits, low, cost.source))

    sum_b = sum(l.bytes[l.pos] for l in ladders)
    sum_t = sum(l.ms[l.pos] for l in ladders)
    if not _fits(cost, limits, sum_b, sum_t):
        sum_b, sum_t = _repair(ladders, cost, limits, sum_b, sum_t)
        if not _fits(cost, limits, sum_b, sum_t):
            raise BudgetError(_infeasible_message(profile.name, limits, low, cost.source)
                              + "; each is reachable alone but not all at once")
    start = cost.quantities(sum_b, sum_t)
    slack = {k: max(lim - start[k], 1e-12) for k, lim in limits.items()}
    # Each quantity is affine in (Σ bytes, Σ ms): its gradient turns a step's Δbytes/Δms into use.
    unit_b, unit_t = cost.quantities(1.0, 0.0), cost.quantities(0.0, 1.0)
    base = cost.quantities(0.0, 0.0)
    grad = {k: (unit_b[k] - base[k], unit_t[k] - base[k]) for k in limits}

    fits = lambda b, t: _fits(cost, limits, b, t)

    while limits:
        best, best_score = None, -np.inf
        for i, lad in enumerate(ladders):
            if lad.pos + 1 >= len(lad.states):
                continue
            nxt = lad.pos + 1
            db, dt = lad.bytes[nxt] - lad.bytes[lad.pos], lad.ms[nxt] - lad.ms[lad.pos]
            if not fits(sum_b + db, sum_t + dt):
                continue
            gain = lad.layer.kept(lad.states[nxt]) - lad.layer.kept(lad.state)
            use = sum(max(g_b * db + g_t * dt, 0.0) / slack[k] for k, (g_b, g_t) in grad.items())
            score = gain / max(use, 1e-15)
            if score > best_score:
                best, best_score = i, score
        if best is None:
            break
        lad = ladders[best]
        sum_b += lad.bytes[lad.pos + 1] - lad.bytes[lad.pos]
        sum_t += lad.ms[lad.pos + 1] - lad.ms[lad.pos]
        lad.pos += 1

    notes = []
    for lad in ladders:  # a factorized layer that is not faster than dense goes dense when it fits
        if lad.state is not None and lad.ms[lad.pos] >= lad.ms[-1]:
            db, dt = lad.bytes[-1] - lad.bytes[lad.pos], lad.ms[-1] - lad.ms[lad.pos]
            if fits(sum_b + db, sum_t + dt):
                notes.append(f"{lad.layer.shape.name}: rank {lad.state} not faster than dense, kept dense")
                sum_b, sum_t = sum_b + db, sum_t + dt
                lad.pos = len(lad.states) - 1
    return _receipt(ladders, cost, budgets, limits, dense, sum_b, sum_t, notes)


def _receipt(ladders: list[_Ladder], cost: CostModel, budgets: dict[str, Budget], limits: dict[str, float],
             dense: dict[str, float], sum_b: float, sum_t: float, notes: list[str]) -> Receipt:
    totals = cost.quantities(sum_b, sum_t)
    rows = [ReceiptRow(l.layer.shape.name, (l.layer.shape.out_features, l.layer.shape.in_features), l.state,
                       l.bytes[l.pos], l.ms[l.pos], l.layer.kept(l.state), l.layer.shape.pivoted) for l in ladders]
    lines = [BudgetLine(k, str(budgets[k]), lim, totals[k], (lim - totals[k]) / lim)
             for k, lim in limits.items()]
    lines.sort(key=lambda b: BUDGET_KEYS.index(b.key))
    if lines:
        min(lines, key=lambda b: b.headroom).binding = True
    kept = float(np.mean([r.importance_kept for r in rows])) if rows else 1.0
    return Receipt(cost.profile.name, cost.source, rows, lines, totals, dense, kept, notes)
