"""Learned importance of singular components: the scored factorized layer and the global selection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .lowrank import break_even_rank


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


@dataclass(frozen=True)
class LayerCandidates:
    """One target layer in the selection: its shape and the learned importance of its candidates."""

    name: str
    out_features: int
    in_features: int
    importance: torch.Tensor  # one value per candidate component, any order

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    def cost(self, rank: int) -> int:
        """Parameters at `rank`; a rank at or past break-even (or full rank) costs the dense layer."""
        if rank >= break_even_rank(self.out_features, self.in_features) or rank >= min(self.out_features, self.in_features):
            return self.dense_params
        return rank * (self.out_features + self.in_features)


def _blocks(layer: LayerCandidates, multiple: int) -> list[tuple[int, float]]:
    """(rank after the block, summed importance of the block) for consecutive blocks of `multiple`
    components in decreasing importance; the last block may be shorter."""
    imp = layer.importance.detach().float().sort(descending=True).values
    out = []
    for start in range(0, imp.numel(), multiple):
        stop = min(start + multiple, imp.numel())
        out.append((stop, float(imp[start:stop].sum())))
    return out


def select_global(layers: list[LayerCandidates], target_params: float, multiple: int) -> dict[str, int | None]:
    """Per-layer ranks whose total parameters come closest to `target_params` from below, chosen
    by importance per unit cost across all layers.

    Every layer starts with one block of `multiple` components (a layer is never removed). Then
    blocks are taken greedily by (block importance ÷ added parameters); inside a layer blocks come
    in decreasing importance, so ratios decrease and the greedy choice keeps every layer a prefix.
    A block that would overshoot the budget is skipped (and its layer closed), so smaller blocks of
    other layers can still fill the remainder. A layer whose rank reaches break-even becomes dense
    (None): its last block then costs the remainder up to the dense size.
    """
    blocks = {l.name: _blocks(l, multiple) for l in layers}
    by_name = {l.name: l for l in layers}
    position = {l.name: 0 for l in layers}  # number of blocks taken
    rank = {l.name: blocks[l.name][0][0] for l in layers}
    position = {name: 1 for name in position}
    total = sum(by_name[n].cost(rank[n]) for n in rank)
    open_layers = {n for n in rank if len(blocks[n]) > 1 and by_name[n].cost(rank[n]) < by_name[n].dense_params}
    while open_layers:
        best, best_ratio, best_added = None, -1.0, 0
        for name in sorted(open_layers):  # sorted: ties resolve the same way on every run
            layer = by_name[name]
            new_rank, importance = blocks[name][position[name]]
            added = layer.cost(new_rank) - layer.cost(rank[name])
            ratio = importance / max(added, 1)
            if ratio > best_ratio:
                best, best_ratio, best_added = name, ratio, added
        layer = by_name[best]
        if total + best_added > target_params:
            open_layers.discard(best)
            continue
        rank[best] = blocks[best][position[best]][0]
        position[best] += 1
        total += best_added
        if position[best] >= len(blocks[best]) or layer.cost(rank[best]) >= layer.dense_params:
            open_layers.discard(best)
    return {n: (None if by_name[n].cost(rank[n]) >= by_name[n].dense_params else rank[n]) for n in rank}


def select_uniform(layers: list[LayerCandidates], ranks: dict[str, int | None]) -> dict[str, int | None]:
    """The ablation: every layer keeps its uniform rank (None stays None), capped by its candidates."""
    return {l.name: (None if ranks[l.name] is None else min(ranks[l.name], l.importance.numel())) for l in layers}


def importance_order(importance: torch.Tensor) -> torch.Tensor:
    """Candidate indices, most important first (ties keep σ order)."""
    return importance.detach().float().sort(descending=True, stable=True).indices


def top_components(importance: torch.Tensor, rank: int) -> torch.Tensor:
    """Indices of the `rank` most important candidates, in their original (σ-descending) order."""
    return importance_order(importance)[:rank].sort().values
