"""Activation statistics: XᵀX (the input Gram matrix) of every targeted Linear, or W·XᵀX·Wᵀ for narrow-output ones, and GᵀG of the loss gradients at its output, over calibration data."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .calibration import CalibrationBatch
from .errors import NoTargetError
from .evaluate import mean_pool
from .reporting import SILENT, Reporter

# A layer that reads its input alone and has at most this fraction of its input's width as outputs
# (down_proj, BERT's output.dense) keeps W·XᵀX·Wᵀ instead of XᵀX: per token that costs out·in + out²
# multiply-adds (the projection, then its Gram) against in², less below (√5 − 1)/2 ≈ 0.618, and
# every spectrum such a layer needs is computed from it (spectra.whiten_spectrum). For Llama-3-8B's
# down_proj (4096 × 14336) that is 2.7× less work (12× where its float32 output serves as X·Wᵀ:
# accumulate) and a 4096² matrix in place of a 14336² one.
OUTPUT_SIDE = 0.6


@dataclass
class Projected:
    """A layer's input statistics kept at its output side: `product` = W·XᵀX·Wᵀ (out×out) and
    `diagonal` = diag(XᵀX) (the per-channel sums of squares asvd and the damping need), float64."""

    product: torch.Tensor
    diagonal: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.product.device


def output_side(out_features: int, in_features: int) -> bool:
    """Whether a layer's statistics may be kept as W·XᵀX·Wᵀ (OUTPUT_SIDE), if it reads its input alone."""
    return out_features <= OUTPUT_SIDE * in_features


def statistics_bytes(linear: nn.Linear) -> int:
    """Bytes of the float64 matrix kept for `linear` at most (not sharing its input with another layer)."""
    width = linear.out_features if output_side(linear.out_features, linear.in_features) else linear.in_features
    return 8 * width * width


@dataclass
class ActivationStats:
    """Gram matrices in float64, one per distinct layer input: XᵀX, or for a layer in `diagonal`
    W·XᵀX·Wᵀ (output_side; `diagonal[layer]` = diag(XᵀX)).

    Layers that read the same tensor (q/k/v, gate/up) share one matrix: `group_of[layer]`
    names the layer whose entry in `gram` they use. `tokens[group]` counts the rows summed.
    """

    gram: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    group_of: dict[str, str] = field(default_factory=dict)
    diagonal: dict[str, torch.Tensor] = field(default_factory=dict)

    def gram_for(self, layer: str) -> torch.Tensor | Projected:
        """XᵀX of the input of `layer` (float64), or its Projected form."""
        group = self.group_of[layer]
        if group in self.diagonal:
            return Projected(self.gram[group], self.diagonal[group])
        return self.gram[group]

    def tokens_for(self, layer: str) -> int:
        return self.tokens[self.group_of[layer]]

    def nbytes(self) -> int:
        """Memory held by the Gram matrices."""
        return sum(g.numel() * g.element_size() for g in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every matrix and diagonal by a unique name (to sum over processes or write to disk)."""
        return {**{f"gram/{k}": v for k, v in self.gram.items()},
                **{f"diagonal/{k}": v for k, v in self.diagonal.items()}}

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> "ActivationStats":
        """These statistics' counts and groups with the matrices of `tensors` (as `tensors()` names them)."""
        parts: dict[str, dict[str, torch.Tensor]] = {"gram": {}, "diagonal": {}}
        for key, value in tensors.items():
            kind, name = key.split("/", 1)
            parts[kind][name] = value
        return ActivationStats(parts["gram"], dict(self.tokens), dict(self.group_of), parts["diagonal"])


def model_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, device: torch.device) -> dict:
    """Keyword arguments for a forward pass of any supported family."""
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def _add(into: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    if key in into:
        into[key] += value
    else:
        into[key] = value


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None and rows.shape[0] == mask.numel():
        rows = rows[mask]
    return rows.float()


def accumulate(stats: ActivationStats, group: str, x: torch.Tensor, mask: torch.Tensor | None,
               layer: nn.Linear | None = None, output: torch.Tensor | None = None) -> None:
    """Add XᵀX of one batch's input `x` of `group` (rows where `mask` is 0 left out) to `stats`, or
    with `layer`, its Projected form: ZᵀZ for Z = X·Wᵀ, and diag(XᵀX). Z is the layer's `output`
    where that is exactly X·Wᵀ in float32 (no bias, not under bf16 autocast), else computed here.

    The products are formed in float32 on the input's device and added to float64 accumulators,
    which keeps the later Cholesky/SVD stable without paying for float64 matmuls. The whole-model
    and the block-streamed paths both add through here, so their matrices are the same bits.
    """
    rows = _rows(x, mask)
    # Never a bfloat16 product, even inside the streamed path's autocast passes (device.calibration_matmuls):
    # whitening squares the matrix's conditioning. Its float32 matmul may still round the inputs to bf16.
    with torch.autocast(rows.device.type, enabled=False):
        if layer is not None:
            _add(stats.diagonal, group, (rows * rows).sum(0).double())
            if output is not None and layer.bias is None and output.dtype == torch.float32:
                rows = _rows(output, mask)
            else:
                rows = rows @ layer.weight.detach().float().T
        g = (rows.T @ rows).double()
    _add(stats.gram, group, g)
    stats.tokens[group] = stats.tokens.get(group, 0) + rows.shape[0]


class GramHooks:
    """Forward hooks on `modules` (name → module) that add XᵀX of each one's input to `stats`;
    layers that read the same tensor (found on the first batch) share one matrix, and a layer that
    reads its input alone and passes `output_side` keeps the Projected form instead. Set `mask` per
    batch with `batch()`, call `batch_done()` after it, `remove()` at the end."""

    def __init__(self, stats: ActivationStats, modules: dict[str, nn.Module]) -> None:
        self.stats, self.mask, self.seen, self.first = stats, None, [], True
        # Who shares an input is known only once the first batch is through: an output-side candidate
        # that reads first is summed in Projected form here, and a second reader of its input (still in
        # hand then) turns the group back to XᵀX; batch_done keeps those left alone.
        self.projected = ActivationStats()
        # Forward hooks, not pre-hooks: an output-side layer's own output is its Z = X·Wᵀ (accumulate).
        self.handles = [m.register_forward_hook(self._hook(name, output_side(m.out_features, m.in_features)))
                        for name, m in modules.items()]

    def _hook(self, name: str, candidate: bool):
        def fn(module, args, output):
            x = args[0]
            if self.first:
                for tensor, group in self.seen:
                    if tensor is x:
                        self.stats.group_of[name] = group
                        if group in self.projected.gram:
                            for part in (self.projected.gram, self.projected.diagonal, self.projected.tokens):
                                del part[group]
                            accumulate(self.stats, group, x, self.mask)
                        return
                self.seen.append((x, name))
                self.stats.group_of[name] = name
                if candidate:
                    accumulate(self.projected, name, x, self.mask, module, output)
                else:
                    accumulate(self.stats, name, x, self.mask)
            elif self.stats.group_of[name] == name:
                if name in self.stats.diagonal:
                    accumulate(self.stats, name, x, self.mask, module, output)
                else:
                    accumulate(self.stats, name, x, self.mask)
        return fn

    def batch(self, mask: torch.Tensor | None) -> None:
        self.mask, self.seen = mask, []

    def batch_done(self) -> None:
        if self.first:
            self.stats.gram.update(self.projected.gram)
            self.stats.diagonal.update(self.projected.diagonal)
            self.stats.tokens.update(self.projected.tokens)
            self.projected = ActivationStats()
        self.first = False

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def collect_statistics(model: nn.Module, targets: list[str], calib: CalibrationBatch,
                       batch_size: int = 16, reporter: Reporter = SILENT) -> ActivationStats:
    """Run the calibration set through `model` and accumulate XᵀX for each target's input.

    Padding positions are excluded (see `accumulate`).
    """
    device = next(model.parameters()).device
    stats = ActivationStats()
    hooks = GramHooks(stats, {t: model.get_submodule(t) for t in targets})
    try:
        n_batches = (calib.input_ids.shape[0] + batch_size - 1) // batch_size
        with reporter.progress("statistics", total=n_batches) as bar:
            for ids, mask in calib.batches(batch_size, by_length=True):
                hooks.batch(mask.reshape(-1).bool().to(device))
                model(**model_inputs(ids, mask, device))
                hooks.batch_done()
                bar.advance()
    finally:
        hooks.remove()
    missing = [t for t in targets if t not in stats.group_of]
    if missing:
        raise NoTargetError(f"layers never called during calibration: {missing[:3]}")
    return stats


class GradientGramHooks:
    """Forward hooks on `modules` (name → module) whose outputs, in backward, add Σ gᵀg of their loss
    gradient to `stats` (one matrix per module, padding excluded: set `mask` per batch with `batch()`);
    `remove()` at the end. K-FAC's output factor, which spectra.curvature_spectrum weighs the SVD with."""

    def __init__(self, stats: ActivationStats, modules: dict[str, nn.Module]) -> None:
        self.stats, self.mask = stats, None
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def on_output(module, args, out):
            if out.requires_grad:
                out.register_hook(lambda g, mask=self.mask: accumulate(self.stats, name, g, mask))
        return on_output

    def batch(self, mask: torch.Tensor | None) -> None:
        self.mask = mask

    def remove(self) -> ActivationStats:
        for h in self.handles:
            h.remove()
        self.stats.group_of = {n: n for n in self.stats.gram}
        return self.stats


def collect_output_gradients(model: nn.Module, targets: list[str], calib: CalibrationBatch, causal: bool,
                             batch_size: int = 16, seed: int = 0, reporter: Reporter = SILENT) -> ActivationStats:
    """Σ gᵀg (float64) at each target's output over the calibration set, padding excluded
    (GradientGramHooks): K-FAC's output factor. A causal LM's g is the gradient of its mean next-token
    cross-entropy (the empirical Fisher). An encoder has no such loss, and its distillation loss has
    zero gradient at the dense model, so g = Jᵀv, J the Jacobian of the unit-normalised mean-pooled
    embedding (what similarity search compares) and v ~ N(0, I) drawn per sequence from `seed`:
    E[ggᵀ] = JᵀJ, the Gauss-Newton matrix of a squared error on that embedding. `tokens` counts the
    gradient terms summed (valid tokens). One forward and backward per batch; the model's parameters
    get no gradients."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    hooks = GradientGramHooks(ActivationStats(), {t: model.get_submodule(t) for t in targets})
    count = float(calib.attention_mask[:, 1:].sum())  # next-token targets over the whole set
    gen = torch.Generator().manual_seed(seed)
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        n_batches = (calib.input_ids.shape[0] + batch_size - 1) // batch_size
        with reporter.progress("loss gradients at the outputs", total=n_batches) as bar, torch.enable_grad():
            for ids, attention in calib.batches(batch_size, by_length=True):
                ids, attention = ids.to(device), attention.to(device)
                hooks.batch(attention.reshape(-1).bool())
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # a graph to differentiate
                if causal:
                    logits = model(inputs_embeds=embeds, attention_mask=attention, use_cache=False).logits
                    valid = attention[:, 1:].bool()
                    loss = F.cross_entropy(logits[:, :-1][valid].float(), ids[:, 1:][valid], reduction="sum") / count
                else:
                    pooled = F.normalize(mean_pool(model(inputs_embeds=embeds, attention_mask=attention)
                                                   .last_hidden_state, attention), dim=-1)
                    loss = (pooled * torch.randn(pooled.shape, generator=gen).to(pooled)).sum()
                loss.backward()
                bar.advance()
    finally:
        stats = hooks.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    missing = [t for t in targets if t not in stats.gram]
    if missing:
        raise NoTargetError(f"layers never called during calibration: {missing[:3]}")
    return stats
