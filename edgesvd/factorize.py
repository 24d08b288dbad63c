"""Factorized layers: the two-MatMul LowRankLinear, its parameter arithmetic, and ranks → factors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .loading import set_submodule
from .spectra import Spectrum

# Two forms of a rank-r factorized out×in layer (FORMS). `plain`: B·A with A r×in and B out×r,
# r·(out+in) parameters; two MatMuls and nothing else, the fastest at a given rank. `pivoted` (Zhao
# et al. 2025, "Pivoting Factorization"): r rows of the product are the pivot rows, A' = B_S·A
# (r×in), and every other row is a combination of them, C = B_R·B_S⁻¹ ((out−r)×r): the same
# function and rank in r·(out+in−r) parameters, never more than the dense layer, so a given size
# keeps far more components (a 576×576 layer at 90 % of its parameters: rank 394 of 576 instead of
# 259), at the price of putting the outputs in place (a Concat and a Gather per layer).
FORMS = ("plain", "pivoted")


def params_at(out_features: int, in_features: int, rank: int | None, pivoted: bool = False) -> int:
    """Weight parameters of an out×in layer at `rank` (None: dense) in its form; the bias is not counted."""
    if rank is None:
        return out_features * in_features
    return rank * (out_features + in_features - (rank if pivoted else 0))


def break_even_rank(out_features: int, in_features: int, pivoted: bool = False) -> float:
    """Rank at which a factorized out×in layer has as many parameters as the dense one (pivoted:
    full rank)."""
    if pivoted:
        return min(out_features, in_features)
    return out_features * in_features / (out_features + in_features)


def rank_for_params(out_features: int, in_features: int, params: float, pivoted: bool = False) -> float:
    """The (fractional) rank whose factorized layer holds `params` weight parameters (pivoted: the
    smaller root of r·(out+in−r) = params), at most break-even."""
    s = out_features + in_features
    if not pivoted:
        return min(params / s, break_even_rank(out_features, in_features))
    full = min(out_features, in_features)
    disc = s * s - 4.0 * params
    if params >= out_features * in_features or disc <= 0:
        return float(full)
    return min(float(full), (s - math.sqrt(disc)) / 2)


def dense_or_rank(out_features: int, in_features: int, rank: int, pivoted: bool = False) -> int | None:
    """`rank`, or None when the factorized layer would be no smaller than the dense one: at or
    above break-even (or at full rank) a layer stays dense."""
    if rank >= break_even_rank(out_features, in_features, pivoted) or rank >= min(out_features, in_features):
        return None
    return rank


def pivot(a: torch.Tensor, b: torch.Tensor, output_rms: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B·A (B out×r, A r×in, r ≤ out) as (A', C, rows): A' = B_S·A holds r pivot rows of the product,
    C = B_R·B_S⁻¹ the rest as combinations of them, and `rows` (out) places each output, so that
    B·A·x = cat(A'x, C·A'x)[rows]. The pivots are r rows of an orthonormal basis Q of B's columns
    (with `output_rms`, each row divided by its output's expected size) whose r×r block has a
    locally maximal volume (`pivot_rows`): in that basis no entry of C exceeds 1.05 in magnitude, so
    B_S is well conditioned. C = B_R·B_S⁻¹ is the same whichever basis of B's columns is used,
    though the rows found may differ. On a real LLM's high-rank layers C's rows still reach norms of
    15–200 (SmolLM2 at keep 0.9: hundreds of entries, outputs of very different sizes), which is why
    4-bit weights need the plain form (exporters/quantize.py). `output_rms` (out), the expected size of each output on the
    calibration data, steers the choice away from outlier outputs (a transformer's residual
    writers have channels 40× the others): the pivot outputs are an activation that int8 quantizes
    with one scale, so one outlier among them would flatten the rest to a few levels; computed
    through C instead, an outlier only needs its own column's scale. Computed in float64 on B's
    device, returned in A's dtype and device."""
    out_features, rank = b.shape
    if rank > out_features:
        raise ValueError(f"rank {rank} exceeds the {out_features} outputs: a pivoted factorization needs r ≤ out")
    bd, ad = b.detach().double(), a.detach().double().to(b.device)
    basis = _orthonormal_columns(bd)
    weighted = basis
    if output_rms is not None:
        rms = output_rms.detach().double().to(b.device)
        weighted = basis / rms.clamp_min(rms.max() * 1e-6 + 1e-30)[:, None]
    order = pivot_rows(weighted)
    sel, rest = order[:rank], order[rank:]
    a_new = bd[sel] @ ad
    c = torch.linalg.solve(basis[sel].T, basis[rest].T).T  # = B_R·B_S⁻¹, from the better-conditioned basis
    rows = torch.empty(out_features, dtype=torch.long, device=order.device)
    rows[order] = torch.arange(out_features, device=order.device)
    return a_new.to(a), c.to(a), rows.to(a.device)


MAXVOL_TOLERANCE = 1.05  # stop swapping rows once no entry of C exceeds this (Goreinov et al.)


def pivot_rows(q: torch.Tensor) -> torch.Tensor:
    """An order of the n rows of `q` (n×r, full column rank) whose first r span a block of locally
    maximal volume: LU with partial pivoting picks a start (getrf, blocked BLAS-3, also on a GPU),
    then maxvol (Goreinov, Oseledets, Savostyanov, Tyrtyshnikov, Zamarashkin & Zamarashkin 2010) swaps
    in the row holding C = Q·Q_S⁻¹'s largest entry, a rank-1 update each, until no entry exceeds
    MAXVOL_TOLERANCE. This replaced LAPACK's pivoted QR (geqp3: mostly matrix-vector work, host only),
    which bounded |C| only in practice and took 5.7 s for an 8192-row factor of rank 1600 where this
    takes 1.1 s (one thread; README, "Choosing the pivot rows"). The rest of the order is ascending."""
    n, r = q.shape
    lu, interchanges = torch.linalg.lu_factor(q)
    perm = list(range(n))
    for i, p in enumerate((interchanges - 1).tolist()):  # LAPACK's row interchanges, 1-based
        perm[i], perm[p] = perm[p], perm[i]
    # P·Q = L·U and Q_S = L₁·U (L₁ the top r×r of L), so P·Q·Q_S⁻¹ = L·L₁⁻¹: I on the chosen rows
    # and, on the others, c = L₂·L₁⁻¹, the only part to search. Float32 is enough to choose rows
    # with; C itself is solved afresh in float64 by `pivot`.
    c = torch.linalg.solve_triangular(lu[:r], lu[r:], upper=False, left=False, unitriangular=True)
    c = c.to(torch.float32, memory_format=torch.contiguous_format)
    del lu
    chosen, others = perm[:r], perm[r:]
    for _ in range(2 * r if n > r else 0):  # each swap multiplies the volume by > MAXVOL_TOLERANCE; a cap all the same
        # Row extremes, then the row: on a CPU, torch's argmax over the whole matrix and its
        # aminmax along rows are each about 10× slower than amax and amin along rows.
        i = int(torch.maximum(c.amax(dim=1), c.amin(dim=1).neg_()).argmax())
        j = int(c[i].abs().argmax())
        pivot_value = float(c[i, j])
        if abs(pivot_value) <= MAXVOL_TOLERANCE:
            break
        # Row i becomes pivot j: every row's combination of the new pivots is a rank-1 update, and
        # the former pivot j, now an other row, takes row i's place, as e_j − (c_i − e_j)/c_ij.
        row = c[i].clone()
        row[j] -= 1.0
        c.addr_(c[:, j].clone(), row, alpha=-1.0 / pivot_value)
        c[i] = row.mul_(-1.0 / pivot_value)
        c[i, j] += 1.0
        chosen[j], others[i] = others[i], chosen[j]
    selected = torch.tensor(chosen, dtype=torch.long, device=q.device)
    rest = torch.tensor(sorted(others), dtype=torch.long, device=q.device)
    return torch.cat([selected, rest])


def _orthonormal_columns(m: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of `m` (float64, full column rank). Factors from a spectrum
    (B = U·√σ) already have orthogonal columns, and normalising them is exact where a QR costs
    4·out·r² (a tenth of a second per SmolLM2 MLP layer); any basis of the same space gives a
    pivoted layer with the same bound on |C| (`pivot`). Orthogonality is checked on four probe
    vectors (QᵀQx = x), 4·out·r multiply-adds instead of QᵀQ's out·r² (0.3 s for an 8192 × 1600
    factor): a basis that passed the probes while slightly off would still give the same C, which
    depends on the column space only."""
    norms = m.norm(dim=0)
    if bool((norms > 0).all()):
        q = m / norms
        probes = torch.randn(q.shape[1], 4, dtype=q.dtype, generator=torch.Generator().manual_seed(0)).to(q.device)
        if float((q.T @ (q @ probes) - probes).abs().max()) < 1e-9:
            return q
    return torch.linalg.qr(m).Q


@dataclass
class LayerRecord:
    """One targeted Linear: its shape, the rank it was given (None: left dense) and its form."""

    name: str
    in_features: int
    out_features: int
    rank: int | None
    bias: bool
    pivoted: bool = False

    @property
    def params_before(self) -> int:
        return params_at(self.out_features, self.in_features, None)

    @property
    def params_after(self) -> int:
        return params_at(self.out_features, self.in_features, self.rank, self.pivoted)


def keep_of(layers: list[LayerRecord]) -> float:
    """Parameters of the targeted layers after ÷ before (dense layers count whole)."""
    before = sum(l.params_before for l in layers)
    return sum(l.params_after for l in layers) / before if before else 1.0


class LowRankLinear(nn.Module):
    """`x ↦ b(a(x))`: `a` is r×in without bias, `b` is out×r with the original bias (the plain form).

    The factors stay separate in forward and in any exported graph; multiplying them back
    would re-create the dense weight and give up the savings.
    """

    pivoted = False

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.b = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                     output_rms: torch.Tensor | None = None) -> "LowRankLinear":
        """Build from A (r×in), B (out×r) and an optional bias (out). `output_rms` (see `pivot`) is kept
        for a layer that is fine-tuned in this form and stored pivoted afterwards (`pivot_layers`)."""
        rank, in_features = a.shape
        out_features = b.shape[0]
        layer = cls(in_features, out_features, rank, bias=bias is not None, device=a.device, dtype=a.dtype)
        with torch.no_grad():
            layer.a.weight.copy_(a)
            layer.b.weight.copy_(b)
            if bias is not None:
                layer.b.bias.copy_(bias)
        layer.output_rms = None if output_rms is None else output_rms.detach().cpu()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    def weight_product(self) -> torch.Tensor:
        """The out×in weight this layer applies (for checks; inference never forms it)."""
        return self.b.weight @ self.a.weight

    @property
    def out_bias(self) -> torch.Tensor | None:
        return self.b.bias

    def extra_repr(self) -> str:
        form = ", pivoted" if self.pivoted else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}{form}"


class PivotedLowRank(LowRankLinear):
    """The pivoted form, `x ↦ cat(a(x)·scale, b(a(x)))[rows] + bias`: `a` (r×in) computes r of the
    outputs (the pivot rows of the rank-r weight, each divided by its `scale`), `b` ((out−r)×r) the
    other outputs from those r, `rows` puts them in place.

    Two MatMuls in forward and in any exported graph (plus a Mul, a Concat and a Gather). The scale
    makes the r values between the MatMuls alike in size on the calibration data: int8 quantizes
    that activation with one scale for all r, and a transformer's residual writers have outputs 40×
    the others that no choice of pivots avoids (a component living in one output).
    """

    pivoted = True

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        nn.Module.__init__(self)
        if not 1 <= rank < out_features:
            raise ValueError(f"rank must be in [1, {out_features}) for {out_features} outputs, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.b = nn.Linear(rank, out_features - rank, bias=False, device=device, dtype=dtype)
        self.register_buffer("rows", torch.arange(out_features, device=device))
        self.register_buffer("scale", torch.ones(rank, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                     output_rms: torch.Tensor | None = None) -> "PivotedLowRank":
        """Build from the product B·A (A r×in, B out×r: any split) and an optional bias (out),
        pivoted (see `pivot`, and there `output_rms`); the layer has A's dtype and device."""
        rank, in_features = a.shape
        out_features = b.shape[0]
        layer = cls(in_features, out_features, rank, bias=bias is not None, device=a.device, dtype=a.dtype)
        a_new, c, rows = pivot(a, b, output_rms)
        scale = torch.ones(rank, dtype=torch.float64)
        if output_rms is not None:
            pivots = rows.argsort()[:rank].cpu()  # the outputs the first r positions hold
            size = output_rms.detach().double().cpu()[pivots]
            scale = size / size.mean() if size.mean() > 0 else scale
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        with torch.no_grad():
            layer.a.weight.copy_(a_new / scale.to(a_new)[:, None])
            layer.b.weight.copy_(c * scale.to(c)[None, :])
            layer.scale.copy_(scale)
            layer.rows.copy_(rows)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            return self.stored_forward(x)
        # In PyTorch, moving the m×out outputs through Concat and Gather cost twice the two MatMuls
        # (SmolLM2 block at 29.7k tokens: 3.7 s against 1.0 s). The order and the scale go into an
        # out×r matrix instead, or into the out×in product when that is fewer operations at this
        # many tokens (high ranks, long inputs); both are the same function.
        tokens = x.numel() // self.in_features
        r, i, o = self.rank, self.in_features, self.out_features
        if tokens * r * (i + o) <= o * r * i + tokens * i * o:
            return nn.functional.linear(self.a(x), self.expanded_b(), self.bias)
        return nn.functional.linear(x, self.weight_product(), self.bias)

    def stored_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward as the exported graph computes it: two MatMuls, Mul, Concat and Gather."""
        kept = self.a(x)
        # Gather along the first axis: onnxruntime copies whole rows there, element by element on the last
        y = torch.cat([kept * self.scale, self.b(kept)], dim=-1).transpose(0, -1)
        y = y.index_select(0, self.rows).transpose(0, -1)
        return y if self.bias is None else y + self.bias

    def expanded_b(self) -> torch.Tensor:
        """The out×r matrix B with B·A = the applied weight: the scaled identity and C, in output order."""
        pivots = torch.eye(self.rank, dtype=self.scale.dtype, device=self.scale.device) * self.scale
        return torch.cat([pivots, self.b.weight], dim=0).index_select(0, self.rows)

    def weight_product(self) -> torch.Tensor:
        a = self.a.weight
        return torch.cat([a * self.scale[:, None], self.b.weight @ a], dim=0).index_select(0, self.rows)

    @property
    def out_bias(self) -> torch.Tensor | None:
        return self.bias


def low_rank_class(pivoted: bool) -> type[LowRankLinear]:
    """The module of a form."""
    return PivotedLowRank if pivoted else LowRankLinear


def replace_with_factors(model: nn.Module, name: str, a: torch.Tensor, b: torch.Tensor, pivoted: bool = False,
                         output_rms: torch.Tensor | None = None) -> LowRankLinear:
    """Swap the Linear at `name` for a LowRankLinear (or PivotedLowRank) holding B·A (dtype and
    device of the Linear)."""
    dense = model.get_submodule(name)
    bias = dense.bias.detach() if dense.bias is not None else None
    if pivoted:  # pivoting computes in float64 from the factors as given
        low = PivotedLowRank.from_factors(a.to(dense.weight.device), b.to(dense.weight.device), bias, output_rms)
        low.to(dense.weight.dtype)
    else:
        low = LowRankLinear.from_factors(a.to(dense.weight), b.to(dense.weight), bias, output_rms)
    set_submodule(model, name, low)
    return low


def pivot_layers(model: nn.Module, records: list[LayerRecord]) -> None:
    """Store every layer whose record says pivoted, and which is still a plain LowRankLinear, in the
    pivoted form: the same product B·A with fewer parameters (`pivot`, steered by the output sizes
    the layer was built with).

    The learned method fine-tunes in the plain form and pivots once at the end: Adam on the pivoted
    factors (A' = B_S·A and C = B_R·B_S⁻¹) diverged on SmolLM2-135M (perplexity 5,537 at keep 0.9,
    against 25.3 before fine-tuning), while the plain factors of the same product train stably."""
    for record in records:
        low = model.get_submodule(record.name)
        if not record.pivoted or isinstance(low, PivotedLowRank):
            continue
        weight = low.a.weight
        bias = None if low.out_bias is None else low.out_bias.detach()
        pivoted = PivotedLowRank.from_factors(weight.detach(), low.b.weight.detach(), bias,
                                              getattr(low, "output_rms", None))
        set_submodule(model, record.name, pivoted.to(weight.dtype))


def apply_ranks(model: nn.Module, spectra: dict[str, Spectrum], ranks: dict[str, int | None],
                orders: dict[str, torch.Tensor] | None = None, scores: dict[str, torch.Tensor] | None = None,
                pivoted: bool = False, pivot_later: bool = False
                ) -> tuple[list[LayerRecord], dict[str, dict[str, torch.Tensor]], list[LowRankLinear]]:
    """Factorize `model` in place: every layer of `ranks` (each a dense Linear in `model`) keeps
    its first `rank` components in `orders` (default: the σ order), scaled by `scores` when given,
    in the plain or the pivoted form; rank None leaves it dense. Every method, the learned method's
    finish and the budget planner build their models with this. `pivot_later`: pivoted layers are
    built plain, to be fine-tuned, and their records say pivoted: `pivot_layers` stores them so.

    Returns the checkpoint's layer records, its spectrum entries (`sigma`, `kept` and, with
    scores, `scores` over the whole spectrum) and the new factorized modules.
    """
    records, entries, factored = [], {}, []
    for name, rank in ranks.items():
        linear = model.get_submodule(name)
        records.append(LayerRecord(name, linear.in_features, linear.out_features, rank, linear.bias is not None,
                                   pivoted and rank is not None))
        spec = spectra.get(name)
        if spec is None:  # rank None without a spectrum (e.g. a plain run keeping a layer dense)
            continue
        full_scores = None
        if scores is not None:
            full_scores = torch.zeros_like(spec.sigma)
            full_scores[: scores[name].numel()] = scores[name].to(full_scores)
        kept = torch.zeros_like(spec.sigma)
        if rank is None:
            kept[:] = 1
        else:
            order = orders[name] if orders is not None else torch.arange(spec.sigma.numel())
            index = order[:rank].sort().values.to(spec.sigma.device)
            a, b = spec.factors(rank, full_scores, index)
            rms = spec.output_rms(index, full_scores) if pivoted else None
            factored.append(replace_with_factors(model, name, a, b, pivoted and not pivot_later, rms))
            kept[index] = 1
        entries[name] = {"sigma": spec.sigma, "kept": kept}
        if full_scores is not None:
            entries[name]["scores"] = full_scores
    return records, entries, factored
