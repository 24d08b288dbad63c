"""The `learned` method: whitened candidates → learned component scores → global selection + fine-tuning.

Stage 1 (coarse): a whitened SVD per target keeps candidate components, `margin` more than the
budget needs. Stage 2 (importance): each target becomes `((x·Aᵀ)·diag(s))·Bᵀ + b` and only the
scores `s` train, against the dense model (distill.py) plus a budget term on the expected kept
parameters, while components are pruned gradually down to the budget. Stage 3 (sparsify +
fine-tune): components are selected across all layers by learned importance per unit cost until
the budget is met, the scores are folded into the factors and the surviving factors are
fine-tuned with the same loss.

Decisions (measured on MiniLM and stories260K): importance is a running Fisher estimate
(s·∂L/∂s)², not |s| — with Adam every score moves at about the learning rate whatever its
gradient, so |s| after a few dozen steps ranks poorly, and a soft budget alone left the scores
near 1 and made the hard switch lose most of the model (loss ×7 on stories260K). Pruning hard
and gradually inside stage 2, with the final rank multiple, makes the switch a no-op.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .checkpoint import LayerRecord
from .distill import Teacher, distill_loss
from .errors import ConfigError
from .importance import LayerCandidates, ScoredLowRank, importance_order, select_global, select_uniform
from .lowrank import LowRankLinear, break_even_rank
from .methods import Spectrum
from .progress import progress_bar
from .ranks import uniform_rank
from .targets import set_submodule

if TYPE_CHECKING:  # compress.py imports this module for LearnedConfig; the helpers come lazily
    from .compress import Prepared

SELECTIONS = ("global", "uniform")


@dataclass(frozen=True)
class LearnedConfig:
    """Knobs of the learned method. Defaults compress MiniLM in a few minutes on 2 CPU cores.

    steps / finetune_steps: optimizer steps of stage 2 (scores) and stage 3 (factors).
    margin: stage 1 keeps candidates up to keep·(1+margin) of each layer (capped at dense).
    lr / finetune_lr: Adam learning rates of the scores and of the factors.
    batch_size: calibration sequences per training step.
    budget_weight: weight of (expected kept params / scheduled target − 1)² in stage 2.
    max_score: cap on the scores (None: amplification allowed; 1.0 is the no-amplification ablation).
    selection: 'global' (importance per unit cost across layers) or 'uniform' (ablation: every layer
    gets the uniform rank and keeps its most important candidates).
    """

    steps: int = 60
    finetune_steps: int = 60
    margin: float = 0.5
    lr: float = 0.05
    finetune_lr: float = 2e-4
    batch_size: int = 8
    budget_weight: float = 10.0
    max_score: float | None = None
    selection: str = "global"

    def __post_init__(self) -> None:
        if self.steps < 0 or self.finetune_steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps} and {self.finetune_steps}")
        if self.margin < 0:
            raise ConfigError(f"margin must be >= 0, got {self.margin}")
        if self.lr <= 0 or self.finetune_lr <= 0:
            raise ConfigError("learning rates must be > 0")
        if self.batch_size < 1:
            raise ConfigError(f"learned batch size must be >= 1, got {self.batch_size}")
        if self.budget_weight < 0:
            raise ConfigError(f"budget weight must be >= 0, got {self.budget_weight}")
        if self.max_score is not None and self.max_score <= 0:
            raise ConfigError(f"max score must be > 0, got {self.max_score}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"unknown selection '{self.selection}' (choose from {', '.join(SELECTIONS)})")


def candidate_rank(out_features: int, in_features: int, keep: float, margin: float, multiple: int) -> int:
    """Stage 1's number of candidates: the rank at keep·(1+margin) of break-even, rounded up to the
    multiple. When that reaches break-even the layer may end dense, and dense means *every*
    component, so then all of them are candidates (their expected cost is capped at dense)."""
    full = min(out_features, in_features)
    be = break_even_rank(out_features, in_features)
    rank = multiple * math.ceil(keep * (1 + margin) * be / multiple)
    return full if rank >= be else max(1, min(rank, full))


class _Batches:
    """Endless shuffled mini-batches of calibration indices from a seeded generator."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.size = n, min(batch_size, n)
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(n, generator=self.gen), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.size > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.order[self.pos : self.pos + self.size]
        self.pos += self.size
        return idx


@torch.no_grad()
def _probe_loss(model: nn.Module, teacher: Teacher, family: str, probe: list[torch.Tensor]) -> float:
    """Mean distillation loss over fixed probe batches (what 'before/after the switch' compares)."""
    return sum(float(distill_loss(model, teacher.batch(i), family)) for i in probe) / len(probe)


def _expected_params(scored: dict[str, ScoredLowRank]) -> torch.Tensor:
    """Differentiable kept parameters: Σ soft mask × (in+out), capped at the dense size per layer."""
    total = 0.0
    for layer in scored.values():
        out_f, in_f = layer.b.shape[0], layer.a.shape[1]
        total = total + torch.clamp(layer.soft_mask().sum() * (in_f + out_f), max=out_f * in_f)
    return total


def _candidates(scored: dict[str, ScoredLowRank], shapes: dict[str, tuple[int, int]]) -> list[LayerCandidates]:
    """The selection's view of the scored layers: shape and current importance of every candidate."""
    return [LayerCandidates(n, *shapes[n], layer.importance.clone()) for n, layer in scored.items()]


def _select(candidates: list[LayerCandidates], budget: float, total_dense: int, multiple: int,
            selection: str) -> dict[str, int | None]:
    """Per-layer ranks under `budget` parameters: global by importance per unit cost, or (the
    ablation) the uniform rank of keep = budget / dense parameters in every layer."""
    if selection == "global":
        return select_global(candidates, budget, multiple)
    keep = budget / total_dense
    return select_uniform(candidates, {c.name: uniform_rank(c.out_features, c.in_features, keep, multiple)
                                       for c in candidates})


def _learn_scores(model: nn.Module, scored: dict[str, ScoredLowRank], shapes: dict[str, tuple[int, int]],
                  teacher: Teacher, family: str, target: float, multiple: int, cfg: LearnedConfig,
                  batches: _Batches, show_progress: bool, total_dense: int) -> list[float]:
    """Stage 2: train the scores only (distillation + budget term) while pruning gradually.

    The budget follows a schedule from the candidates' size down to `target`: after a warm-up of
    a tenth of the steps (importance only) it falls linearly until 2/3 of the steps, and the last
    third runs at the target so the surviving scores adapt to what was removed. At every step the
    components are re-selected globally by importance per unit cost under the scheduled budget,
    with the same rank multiple as the final selection, so the soft-to-hard switch of stage 3 is
    (nearly) no change. The differentiable term (expected kept / scheduled − 1)², active while the
    soft mask is over the schedule, pushes the scores of the least useful components down first.
    Returns the distillation loss per step.
    """
    params = [layer.scores for layer in scored.values()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    start = float(sum(c.cost(c.importance.numel()) for c in _candidates(scored, shapes)))
    warm, end = max(1, cfg.steps // 10), max(2, math.ceil(cfg.steps * 2 / 3))
    losses = []
    with progress_bar("stage 2: learn scores", total=cfg.steps, enabled=show_progress) as bar:
        for step in range(cfg.steps):
            frac = min(1.0, max(0.0, (step + 1 - warm) / max(1, end - warm)))
            scheduled = start + (target - start) * frac
            opt.zero_grad(set_to_none=True)
            distill = distill_loss(model, teacher.batch(batches.next()), family)
            distill.backward()
            for layer in scored.values():
                layer.update_importance()
            expected = _expected_params(scored)
            if cfg.budget_weight > 0:
                (cfg.budget_weight * torch.relu(expected / scheduled - 1) ** 2).backward()
            opt.step()
            with torch.no_grad():
                if cfg.max_score is not None:
                    for p in params:
                        p.clamp_(-cfg.max_score, cfg.max_score)
                if step + 1 >= warm:
                    ranks = _select(_candidates(scored, shapes), scheduled, total_dense, multiple, cfg.selection)
                    for name, layer in scored.items():
                        layer.keep_only(ranks[name])
            losses.append(float(distill.detach()))
            bar.describe(f"stage 2: learn scores · loss {losses[-1]:.4f} · "
                         f"keep {scheduled / total_dense:.3f} (soft {float(expected.detach()) / total_dense:.3f})")
            bar.advance()
    return losses


def _finetune(model: nn.Module, factored: list[LowRankLinear], teacher: Teacher, family: str,
              cfg: LearnedConfig, batches: _Batches, show_progress: bool) -> list[float]:
    """Stage 3's recovery: train the surviving factors A and B (everything else frozen), linear decay."""
    params = [p for layer in factored for p in (layer.a.weight, layer.b.weight)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.finetune_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / max(1, cfg.finetune_steps))
    losses = []
    with progress_bar("stage 3: fine-tune factors", total=cfg.finetune_steps, enabled=show_progress) as bar:
        for _ in range(cfg.finetune_steps):
            loss = distill_loss(model, teacher.batch(batches.next()), family)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.describe(f"stage 3: fine-tune factors · loss {losses[-1]:.4f}")
            bar.advance()
    for p in params:
        p.requires_grad_(False)
    return losses


@dataclass
class LearnedState:
    """Stages 1–2 done: `model` holds scored layers; stage 3 can finish it for any rank plan.

    `dense` holds the original Linears (frozen, shared by every finished copy), `spectra` their
    whitened spectra, `scored` the scored layers inside `model`.
    """

    model: nn.Module
    family: str
    targets: list[str]
    dense: dict[str, nn.Linear]
    spectra: dict[str, Spectrum]
    scored: dict[str, ScoredLowRank]
    teacher: Teacher
    probe: list[torch.Tensor]
    stage2_batches: _Batches
    cfg: LearnedConfig
    seed: int
    keep: float
    losses: dict[str, float]
    curve2: list[float]
    timings: dict[str, float]

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: tuple(self.dense[n].weight.shape) for n in self.targets}

    @property
    def total_dense(self) -> int:
        return sum(l.weight.numel() for l in self.dense.values())

    def batches(self) -> _Batches:
        """Stage 3's mini-batches: stage 2's sequence continued, the same for every finished copy."""
        return copy.deepcopy(self.stage2_batches)


def learn_importance(prepared: Prepared, keep: float, multiple: int, cfg: LearnedConfig, seed: int = 0,
                     show_progress: bool = True, spectra: dict[str, Spectrum] | None = None) -> LearnedState:
    """Stages 1 and 2 on `prepared.model` in place: whitened candidates, then scores learned while
    pruning gradually down to `keep` of the targeted parameters. `spectra`: the targets' whitened
    spectra when the caller has them already (saves one SVD per layer)."""
    from .compress import layer_spectrum

    torch.manual_seed(seed)
    model, family, stats = prepared.model, prepared.source.family, prepared.stats
    if stats is None or prepared.calib is None:
        raise ConfigError("method 'learned' needs calibration statistics")
    for p in model.parameters():
        p.requires_grad_(False)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    teacher = Teacher(model, prepared.calib, family, prepared.device)
    timings["teacher_s"] = time.perf_counter() - t0

    # Stage 1: whitened candidates.
    t0 = time.perf_counter()
    spectra = dict(spectra or {})
    dense: dict[str, nn.Linear] = {}
    scored: dict[str, ScoredLowRank] = {}
    with progress_bar("stage 1: whitened candidates", total=len(prepared.targets), enabled=show_progress) as bar:
        for name in prepared.targets:
            linear = model.get_submodule(name)
            out_f, in_f = linear.weight.shape
            spec = spectra[name] if name in spectra else layer_spectrum(model, name, "whiten", stats)
            k = candidate_rank(out_f, in_f, keep, cfg.margin, multiple)
            a, b = spec.factors(k)
            layer = ScoredLowRank(a.to(linear.weight), b.to(linear.weight),
                                  None if linear.bias is None else linear.bias.detach())
            spectra[name], dense[name], scored[name] = spec, linear, layer
            set_submodule(model, name, layer)
            bar.advance()
    timings["stage1_s"] = time.perf_counter() - t0
    total_dense = sum(l.weight.numel() for l in dense.values())

    n = prepared.calib.input_ids.shape[0]
    batches = _Batches(n, cfg.batch_size, seed)
    probe_gen = _Batches(n, cfg.batch_size, seed + 1)
    probe = [probe_gen.next() for _ in range(min(4, max(1, n // cfg.batch_size)))]
    losses: dict[str, float] = {"stage1": _probe_loss(model, teacher, family, probe)}

    # Stage 2: learn the scores.
    t0 = time.perf_counter()
    shapes = {name: tuple(dense[name].weight.shape) for name in prepared.targets}
    curve2 = _learn_scores(model, scored, shapes, teacher, family, keep * total_dense, multiple, cfg, batches,
                           show_progress, total_dense)
    timings["stage2_s"] = time.perf_counter() - t0
    losses["before_switch"] = _probe_loss(model, teacher, family, probe)
    return LearnedState(model, family, list(prepared.targets), dense, spectra, scored, teacher, probe, batches, cfg, seed,
                        keep, losses, curve2, timings)


def finish(state: LearnedState, ranks: dict[str, int | None], orders: dict[str, torch.Tensor],
           scores: dict[str, torch.Tensor], model: nn.Module | None = None, show_progress: bool = True
           ) -> tuple[nn.Module, list[LayerRecord], dict[str, dict[str, torch.Tensor]], dict]:
    """Stage 3 for one rank plan: keep each layer's first `rank` candidates of `orders`, fold
    `scores` into their factors, fine-tune the factors.

    Works on `model` (a copy of `state.model`, so one learning pass can finish several plans) or
    on `state.model` itself. Returns the model, the per-layer records (None = left dense), the
    spectra (`sigma`, `scores`, `kept` over the full whitened spectrum) and the details.
    """
    from .compress import replace_with_factors

    model = state.model if model is None else model
    t0 = time.perf_counter()
    layers, out_spectra, factored = [], {}, []
    for name in state.targets:
        linear, spec = state.dense[name], state.spectra[name]
        out_f, in_f = linear.weight.shape
        full_scores = torch.zeros_like(spec.sigma)
        full_scores[: scores[name].numel()] = scores[name].to(full_scores)
        kept = torch.zeros_like(spec.sigma)
        rank = ranks[name]
        # Back to dense (stays so when break-even was reached); a copy gets its own Linear, so
        # moving one finished model between devices leaves the shared originals alone.
        set_submodule(model, name, linear if model is state.model else copy.deepcopy(linear))
        if rank is None:
            kept[:] = 1
        else:
            index = orders[name][:rank].sort().values.to(spec.sigma.device)
            a, b = spec.factors(rank, full_scores, index)
            factored.append(replace_with_factors(model, name, a, b))
            kept[index] = 1
        layers.append(LayerRecord(name, in_f, out_f, rank, linear.bias is not None))
        out_spectra[name] = {"sigma": spec.sigma, "scores": full_scores, "kept": kept}
    losses = dict(state.losses)
    losses["after_switch"] = _probe_loss(model, state.teacher, state.family, state.probe)
    curve3 = (_finetune(model, factored, state.teacher, state.family, state.cfg, state.batches(), show_progress)
              if state.cfg.finetune_steps and factored else [])
    losses["after_finetune"] = _probe_loss(model, state.teacher, state.family, state.probe)
    timings = {**state.timings, "stage3_s": time.perf_counter() - t0}
    details = {
        "learned": asdict(state.cfg),
        "importance_keep": state.keep,
        "losses": {k: round(v, 6) for k, v in losses.items()},
        "stage2_curve": [round(v, 5) for v in state.curve2[:: max(1, len(state.curve2) // 20)]],
        "stage3_curve": [round(v, 5) for v in curve3[:: max(1, len(curve3) // 20)]],
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "teacher_cached": state.teacher.cache is not None,
    }
    return model, layers, out_spectra, details


def learned_compress(prepared: Prepared, keep: float, multiple: int, cfg: LearnedConfig, seed: int = 0,
                     show_progress: bool = True) -> tuple[list[LayerRecord], dict[str, dict[str, torch.Tensor]], dict]:
    """Run the three stages on `prepared.model` in place at one keep.

    Returns the per-layer records (ranks; None = left dense), the per-layer spectra
    (`sigma`, learned `scores`, `kept` mask, all over the full whitened spectrum) and the details
    (configuration, losses before/after the soft-to-hard switch, timings, per-stage loss curves).
    """
    state = learn_importance(prepared, keep, multiple, cfg, seed, show_progress)
    candidates = _candidates(state.scored, state.shapes)
    ranks = _select(candidates, keep * state.total_dense, state.total_dense, multiple, cfg.selection)
    orders = {c.name: importance_order(c.importance) for c in candidates}
    scores = {n: (layer.scores * layer.alive).detach() for n, layer in state.scored.items()}
    state.scored = {}  # the scored layers leave the model in stage 3; nothing else needs them
    _, layers, spectra, details = finish(state, ranks, orders, scores, show_progress=show_progress)
    return layers, spectra, details
