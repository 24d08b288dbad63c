"""Distillation against the dense model: teacher targets, the student loss, and fine-tuning the kept factors."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import CalibrationBatch
from .factorize import LowRankLinear
from .families import Family
from .reporting import SILENT, Reporter

# Teacher outputs are cached for the whole calibration set when they fit in this many bytes;
# otherwise (large vocabularies) the teacher runs again on every batch.
CACHE_LIMIT_BYTES = 1 << 30


def _outputs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, family: Family) -> torch.Tensor:
    """What the loss compares: logits for causal LMs; every block's hidden state (stacked on
    dim 0, embeddings excluded) for encoders."""
    if family.causal:  # no KV cache: nothing generates here, and a recomputed (checkpointed) block would append twice
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return torch.stack(out.hidden_states[1:])


@dataclass
class Batch:
    """One training batch: token ids, attention mask (trimmed to its longest row) and teacher targets."""

    ids: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor


class Teacher:
    """The dense model's outputs on the calibration set, cached when small enough.

    Build it before the model is factorized. Caching once saves one forward pass per training
    step; the cache is float32 on the compression device.
    """

    def __init__(self, model: nn.Module, calib: CalibrationBatch, family: Family, device: torch.device,
                 batch_size: int = 16) -> None:
        self.model, self.calib, self.family, self.device = model, calib, family, device
        n, length = calib.input_ids.shape
        # Encoders' outputs are blocks × batch × tokens × hidden, decoders' batch × tokens × vocab.
        self._batch_dim = 0 if family.causal else 1
        probe = self._run(calib.input_ids[:1], calib.attention_mask[:1])
        per_token = probe.numel() // probe.shape[self._batch_dim + 1]
        self.cache: torch.Tensor | None = None
        if n * length * per_token * 4 <= CACHE_LIMIT_BYTES:
            chunks = [self._run(i, m) for i, m in calib.batches(batch_size)]
            self.cache = torch.cat(chunks, dim=self._batch_dim)
            self.model = None  # the cache replaces the teacher
        else:
            # The caller goes on to factorize `model` in place, so the teacher needs its own copy.
            self.model = copy.deepcopy(model)

    @torch.no_grad()
    def _run(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _outputs(self.model, ids.to(self.device), mask.to(self.device), self.family).float()

    def batch(self, index: torch.Tensor) -> Batch:
        """Sequences `index` of the calibration set with their teacher targets, padding trimmed."""
        ids, mask = self.calib.input_ids[index], self.calib.attention_mask[index]
        # Encoders pad on the right: dropping all-padding columns saves compute and changes nothing.
        width = ids.shape[1] if self.family.causal else int(mask.sum(1).max())
        ids, mask = ids[:, :width].to(self.device), mask[:, :width].to(self.device)
        if self.cache is None:
            target = self._run(ids, mask)
        else:
            target = self.cache.index_select(self._batch_dim, index.to(self.cache.device))
            target = target if self.family.causal else target[:, :, :width]
        return Batch(ids, mask, target)


class HiddenTeacher:
    """Teacher targets of a decoder whose dense model is no longer in memory: the dense model's last
    hidden states (N × T × hidden, kept by the streamed path) through the final norm and head, which
    the student shares frozen, computed per batch. Same interface as Teacher."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_hidden: torch.Tensor,
                 norm: nn.Module, head: nn.Module, family: Family, device: torch.device,
                 softcap: float | None = None) -> None:
        self.input_ids, self.attention_mask, self.last_hidden = input_ids, attention_mask, last_hidden
        self.norm, self.head, self.family, self.device, self.softcap = norm, head, family, device, softcap
        self.cache = None

    @torch.no_grad()
    def batch(self, index: torch.Tensor) -> Batch:
        logits = self.head(self.norm(self.last_hidden[index].to(self.device))).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return Batch(self.input_ids[index].to(self.device), self.attention_mask[index].to(self.device), logits)


def _kl_loss(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions, mean over tokens."""
    valid = batch.mask.bool()
    logp = F.log_softmax(out[valid], dim=-1)
    logq = F.log_softmax(batch.target[valid], dim=-1)
    return F.kl_div(logp, logq, log_target=True, reduction="batchmean")


def _hidden_loss(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per block, MSE of hidden states normalised by the teacher's per-block variance (so every
    block weighs the same), plus 1 − cosine of the mean-pooled last hidden states (the sentence
    embedding a retrieval or STS user consumes)."""
    valid = batch.mask.bool()
    s, t = out[:, valid], batch.target[:, valid]  # blocks × tokens × hidden
    var = t.var(dim=(1, 2), keepdim=True).clamp_min(1e-8)
    hidden = (((s - t) ** 2) / var).mean()
    m = batch.mask.unsqueeze(-1).float()
    pool_s = (out[-1] * m).sum(1) / m.sum(1).clamp_min(1)
    pool_t = (batch.target[-1] * m).sum(1) / m.sum(1).clamp_min(1)
    cosine = (1 - F.cosine_similarity(pool_s, pool_t, dim=-1)).mean()
    return hidden + cosine


def distill_loss(model: nn.Module, batch: Batch, family: Family) -> torch.Tensor:
    """Student-vs-teacher loss on one batch (padding excluded): KL for causal LMs, hidden states
    and the pooled embedding for encoders."""
    out = _outputs(model, batch.ids, batch.mask, family).float()
    return _kl_loss(out, batch) if family.causal else _hidden_loss(out, batch)


class MiniBatches:
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
def probe_loss(model: nn.Module, teacher: Teacher, probe: list[torch.Tensor]) -> float:
    """Mean distillation loss over fixed probe batches (what 'before/after the switch' compares)."""
    return sum(float(distill_loss(model, teacher.batch(i), teacher.family)) for i in probe) / len(probe)


def finetune_factors(model: nn.Module, factored: list[LowRankLinear], teacher: Teacher, steps: int, lr: float,
                     batches: MiniBatches, reporter: Reporter = SILENT, dense: list[nn.Linear] = ()) -> list[float]:
    """Train the factors A and B of `factored`, and the weights and biases of the `dense` Linears
    (targets the selection left dense), against the teacher with Adam and a linear decay;
    everything else stays frozen. Returns the loss per step."""
    params = [p for layer in factored for p in (layer.a.weight, layer.b.weight)]
    params += [p for layer in dense for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / max(1, steps))
    losses = []
    with reporter.progress("stage 3: fine-tune factors", total=steps) as bar:
        for _ in range(steps):
            loss = distill_loss(model, teacher.batch(batches.next()), teacher.family)
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
