"""Importance of every singular component: whitened energy shares, or scores learned by distillation.

Whitened importance is a component's share of its layer's output energy, σ²/Σσ². Learned
importance trains one score per component (`x ↦ ((x·Aᵀ)·diag(s))·Bᵀ + b`, stage 2 of the learned
method) against the dense model while pruning gradually to the budget; a component's importance
is a running Fisher estimate (s·∂L/∂s)² of how much the loss would rise without it.

Decisions (measured on MiniLM and stories260K): importance is the Fisher estimate, not |s| — with
Adam every score moves at about the learning rate whatever its gradient, so |s| after a few dozen
steps ranks poorly, and a soft budget alone left the scores near 1 and made the hard switch lose
most of the model (loss ×7 on stories260K). Pruning hard and gradually inside stage 2, with the
final rank multiple, makes the switch to the final selection a no-op.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .costmodel import LayerShape
from .factorize import break_even_rank, params_at, rank_for_params
from .finetune import MiniBatches, Teacher, distill_loss
from .loading import set_submodule
from .planner import LayerImportance, select_global, select_uniform
from .reporting import SILENT, Reporter
from .spectra import Spectrum

SELECTIONS = ("global", "uniform")
# Where stage 1's candidates come from (Learned.candidates).
CANDIDATE_SPECTRA = ("curvature", "whiten")


def layer_shape(linear: nn.Linear, name: str, pivoted: bool = False) -> LayerShape:
    """The LayerShape of a dense Linear, to be factorized in the plain or pivoted form."""
    return LayerShape(name, linear.out_features, linear.in_features, linear.bias is not None, pivoted)


def importance_order(importance: torch.Tensor) -> torch.Tensor:
    """Candidate indices, most important first (ties keep σ order)."""
    return importance.detach().float().sort(descending=True, stable=True).indices


def top_components(importance: torch.Tensor, rank: int) -> torch.Tensor:
    """Indices of the `rank` most important candidates, in their original (σ-descending) order."""
    return importance_order(importance)[:rank].sort().values


# -- whitened importance ---------------------------------------------------------------------------
def component_importance(sigma: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-component importance of one layer from its whitened spectrum, and the order that sorts
    it (most important first).

    Importance is the component's share of the layer's output energy, σ² / Σσ²: truncating
    component i raises the layer's calibration output error by σᵢ². Shares make layers of
    different scale comparable.
    """
    sig = np.asarray(sigma.detach().cpu().double() if isinstance(sigma, torch.Tensor) else sigma, dtype=np.float64)
    energy = sig ** 2
    order = np.argsort(-energy, kind="stable")
    total = energy.sum()
    return (energy[order] / total if total > 0 else np.full(len(energy), 1.0 / max(len(energy), 1))), order


def whitened_importances(model: nn.Module, spectra: dict[str, Spectrum], pivoted: bool = False
                         ) -> tuple[list[LayerImportance], dict[str, torch.Tensor]]:
    """The planner's view of whitened spectra: each target's energy shares (most important first)
    and the component order they imply (keeping rank r keeps `order[:r]`)."""
    layers, orders = [], {}
    for name, spec in spectra.items():
        imp, order = component_importance(spec.sigma)
        layers.append(LayerImportance(layer_shape(model.get_submodule(name), name, pivoted), imp))
        orders[name] = torch.as_tensor(order.copy())
    return layers, orders


# -- learned importance ----------------------------------------------------------------------------
class ScoredLowRank(nn.Module):
    """`x ↦ ((x · Aᵀ) · diag(s)) · Bᵀ + b` with frozen candidate factors and learnable scores `s`.

    A (k×in) and B (out×k) are the top-k whitened components with √σ on each side, so s = 1 is
    the plain truncation; s → 0 prunes a component, s > 1 amplifies it. `alive` (0/1) marks the
    components not yet pruned; `importance` accumulates a running Fisher estimate (s·∂L/∂s)² of
    how much the loss would rise if a component were removed.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("a", a.detach().clone())
        self.register_buffer("b", b.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.scores = nn.Parameter(torch.ones(a.shape[0], dtype=a.dtype, device=a.device))
        self.register_buffer("alive", torch.ones_like(self.scores))
        self.register_buffer("importance", torch.zeros_like(self.scores))
        # What a component was worth when it was pruned (its importance then decays with no
        # gradient): the budget planner ranks components of several budgets from one learning pass.
        self.register_buffer("pruned_importance", torch.zeros_like(self.scores))
        self.register_buffer("pruned_scores", torch.ones_like(self.scores))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x @ self.a.T) * (self.scores * self.alive)
        out = h @ self.b.T
        return out if self.bias is None else out + self.bias

    def soft_mask(self) -> torch.Tensor:
        """How much of each component counts as kept: |s| clipped to [0, 1] (amplifying is free)."""
        return self.scores.abs().clamp(max=1.0) * self.alive

    @torch.no_grad()
    def update_importance(self, decay: float = 0.9) -> None:
        """Fold this step's (s·∂L/∂s)² into the running importance (call after backward of the loss)."""
        if self.scores.grad is not None:
            self.importance.mul_(decay).add_((1 - decay) * (self.scores * self.scores.grad) ** 2)

    @torch.no_grad()
    def keep_only(self, rank: int | None) -> None:
        """Prune all but the `rank` most important alive components (None: keep all, i.e. dense)."""
        before = self.alive.clone()
        self.alive.fill_(1.0 if rank is None else 0.0)
        if rank is not None:
            self.alive[top_components(self.importance, rank)] = 1.0
        pruned = (before > 0) & (self.alive == 0)
        self.pruned_importance[pruned] = self.importance[pruned]
        self.pruned_scores[pruned] = self.scores.detach()[pruned]

    @torch.no_grad()
    def path_importance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(importance, score) of every candidate along the pruning path: the current values for
        the survivors, the values at the moment of pruning for the others."""
        alive = self.alive > 0
        return (torch.where(alive, self.importance, self.pruned_importance),
                torch.where(alive, self.scores.detach(), self.pruned_scores))

    def kept_scores(self) -> torch.Tensor:
        """The scores of the alive components (0 for pruned ones), to fold into the factors."""
        return (self.scores * self.alive).detach()


def candidate_rank(out_features: int, in_features: int, keep: float, margin: float, multiple: int,
                   pivoted: bool = False) -> int:
    """Stage 1's number of candidates: the rank holding keep·(1+margin) of the layer's parameters
    (in its form), rounded up to the multiple. When that reaches break-even the layer may end dense,
    and dense means *every* component, so then all of them are candidates (their expected cost is
    capped at dense)."""
    full = min(out_features, in_features)
    be = break_even_rank(out_features, in_features, pivoted)
    params = keep * (1 + margin) * params_at(out_features, in_features, None)
    rank = multiple * math.ceil(rank_for_params(out_features, in_features, params, pivoted) / multiple)
    return full if rank >= be else max(1, min(rank, full))


def attach_scores(model: nn.Module, spectra: dict[str, Spectrum], keep: float, margin: float, multiple: int,
                  reporter: Reporter = SILENT, pivoted: bool = False
                  ) -> tuple[dict[str, nn.Linear], dict[str, ScoredLowRank]]:
    """Stage 1: replace every target of `spectra` in `model` by a ScoredLowRank over its top
    candidates (the top components of its spectrum). Returns the original Linears and the scored layers."""
    dense: dict[str, nn.Linear] = {}
    scored: dict[str, ScoredLowRank] = {}
    with reporter.progress("stage 1: candidates", total=len(spectra)) as bar:
        for name, spec in spectra.items():
            linear = model.get_submodule(name)
            k = candidate_rank(linear.out_features, linear.in_features, keep, margin, multiple, pivoted)
            a, b = spec.factors(k)
            layer = ScoredLowRank(a.to(linear.weight), b.to(linear.weight),
                                  None if linear.bias is None else linear.bias.detach())
            dense[name], scored[name] = linear, layer
            set_submodule(model, name, layer)
            bar.advance()
    return dense, scored


def scored_importances(scored: dict[str, ScoredLowRank], shapes: dict[str, LayerShape],
                       path: bool = False) -> list[LayerImportance]:
    """The selection's view of the scored layers: each candidate's current importance (or, with
    `path`, its importance along the pruning path), most important first."""
    out = []
    for name, layer in scored.items():
        imp = layer.path_importance()[0] if path else layer.importance
        out.append(LayerImportance(shapes[name], imp.detach().double().sort(descending=True).values.cpu().numpy()))
    return out


def select(layers: list[LayerImportance], budget: float, total_dense: int, multiple: int,
           selection: str = "global") -> dict[str, int | None]:
    """Per-layer ranks under `budget` parameters: global by importance per unit cost, or (the
    ablation) the uniform rank of keep = budget / dense parameters in every layer."""
    if selection == "global":
        return select_global(layers, budget, multiple)
    return select_uniform(layers, budget / total_dense, multiple)


def _expected_params(scored: dict[str, ScoredLowRank], shapes: dict[str, LayerShape]) -> torch.Tensor:
    """Differentiable kept parameters: those of each layer's soft rank r = Σ soft mask in its form,
    r·(in+out) or r·(in+out−r), capped at the dense size."""
    total = 0.0
    for name, layer in scored.items():
        out_f, in_f = layer.b.shape[0], layer.a.shape[1]
        r = layer.soft_mask().sum()
        if shapes[name].pivoted:
            r = torch.clamp(r, max=min(out_f, in_f))
            total = total + r * (out_f + in_f - r)
        else:
            total = total + torch.clamp(r * (in_f + out_f), max=out_f * in_f)
    return total


def learn_scores(model: nn.Module, scored: dict[str, ScoredLowRank], shapes: dict[str, LayerShape],
                 teacher: Teacher, target: float, multiple: int, steps: int, lr: float, batches: MiniBatches,
                 budget_weight: float = 10.0, max_score: float | None = None, selection: str = "global",
                 reporter: Reporter = SILENT) -> list[float]:
    """Stage 2: train the scores only (distillation + budget term) while pruning gradually.

    The budget follows a schedule from the candidates' size down to `target` parameters: after a
    warm-up of a tenth of the steps (importance only) it falls linearly until 2/3 of the steps,
    and the last third runs at the target so the surviving scores adapt to what was removed. At
    every step the components are re-selected globally by importance per unit cost under the
    scheduled budget, with the same rank multiple as the final selection, so the soft-to-hard
    switch of stage 3 is (nearly) no change. The differentiable term (expected kept / scheduled −
    1)², active while the soft mask is over the schedule, pushes the scores of the least useful
    components down first. Returns the distillation loss per step.
    """
    params = [layer.scores for layer in scored.values()]
    opt = torch.optim.Adam(params, lr=lr)
    total_dense = sum(s.params(None) for s in shapes.values())
    start = float(sum(l.cost(len(l.importance)) for l in scored_importances(scored, shapes)))
    warm, end = max(1, steps // 10), max(2, math.ceil(steps * 2 / 3))
    losses = []
    with reporter.progress("stage 2: learn scores", total=steps) as bar:
        for step in range(steps):
            frac = min(1.0, max(0.0, (step + 1 - warm) / max(1, end - warm)))
            scheduled = start + (target - start) * frac
            opt.zero_grad(set_to_none=True)
            distill = distill_loss(model, teacher.batch(batches.next()), teacher.family)
            distill.backward()
            for layer in scored.values():
                layer.update_importance()
            expected = _expected_params(scored, shapes)
            if budget_weight > 0:
                (budget_weight * torch.relu(expected / scheduled - 1) ** 2).backward()
            opt.step()
            with torch.no_grad():
                if max_score is not None:
                    for p in params:
                        p.clamp_(-max_score, max_score)
                if step + 1 >= warm:
                    ranks = select(scored_importances(scored, shapes), scheduled, total_dense, multiple, selection)
                    for name, layer in scored.items():
                        layer.keep_only(ranks[name])
            losses.append(float(distill.detach()))
            bar.describe(f"stage 2: learn scores · loss {losses[-1]:.4f} · "
                         f"keep {scheduled / total_dense:.3f} (soft {float(expected.detach()) / total_dense:.3f})")
            bar.advance()
    return losses


def learned_importances(scored: dict[str, ScoredLowRank], shapes: dict[str, LayerShape]
                        ) -> tuple[list[LayerImportance], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The planner's view of one learning pass: every candidate's learned importance along the
    pruning path (see ScoredLowRank.path_importance), the order it implies and the scores to fold.

    Learned importance estimates how much the distillation loss rises when a component goes, so
    it compares across layers as it is; it is only scaled so that all layers together hold
    `len(layers)` (the receipt's "importance kept" is then the share of the total kept). Layers
    have importance for their candidates only: a plan may keep a prefix of them, or the layer dense.
    """
    paths = {name: layer.path_importance() for name, layer in scored.items()}
    total = float(sum(imp.double().sum() for imp, _ in paths.values())) or 1.0
    scale = len(paths) / total
    layers, orders, scores = [], {}, {}
    for name, (imp, score) in paths.items():
        order = importance_order(imp)
        layers.append(LayerImportance(shapes[name], (imp.double()[order] * scale).cpu().numpy()))
        orders[name], scores[name] = order.cpu(), score.cpu()
    return layers, orders, scores
