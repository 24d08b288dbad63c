"""Distillation against the dense model: teacher targets on calibration data and the student loss."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import CalibrationBatch

# Teacher outputs are cached for the whole calibration set when they fit in this many bytes;
# otherwise (large vocabularies) the teacher runs again on every batch.
CACHE_LIMIT_BYTES = 1 << 30


def _outputs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, family: str) -> torch.Tensor:
    """What the loss compares: logits for decoders; every block's hidden state (stacked on
    dim 0, embeddings excluded) for encoders."""
    if family == "decoder":
        return model(input_ids=ids, attention_mask=mask).logits
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

    def __init__(self, model: nn.Module, calib: CalibrationBatch, family: str, device: torch.device,
                 batch_size: int = 16) -> None:
        self.model, self.calib, self.family, self.device = model, calib, family, device
        n, length = calib.input_ids.shape
        probe = self._run(calib.input_ids[:1], calib.attention_mask[:1])
        per_token = probe[..., 0, 0, :].numel() if family == "encoder" else probe.shape[-1]
        self.cache: torch.Tensor | None = None
        if n * length * per_token * 4 <= CACHE_LIMIT_BYTES:
            chunks = [self._run(i, m) for i, m in calib.batches(batch_size)]
            self.cache = torch.cat(chunks, dim=1 if family == "encoder" else 0)
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
        width = int(mask.sum(1).max()) if self.family == "encoder" else ids.shape[1]
        # Encoders pad on the right: dropping all-padding columns saves compute and changes nothing.
        ids, mask = ids[:, :width].to(self.device), mask[:, :width].to(self.device)
        if self.cache is None:
            target = self._run(ids, mask)
        elif self.family == "encoder":
            target = self.cache[:, index.to(self.cache.device), :width]
        else:
            target = self.cache[index.to(self.cache.device)]
        return Batch(ids, mask, target)


def distill_loss(model: nn.Module, batch: Batch, family: str) -> torch.Tensor:
    """Student-vs-teacher loss on one batch (padding excluded).

    Decoders: KL(teacher ‖ student) of the next-token distributions, mean over tokens.
    Encoders: per block, MSE of hidden states normalised by the teacher's per-block variance (so
    every block weighs the same), plus 1 − cosine of the mean-pooled last hidden states (the
    sentence embedding a retrieval or STS user consumes).
    """
    out = _outputs(model, batch.ids, batch.mask, family).float()
    valid = batch.mask.bool()
    if family == "decoder":
        logp = F.log_softmax(out[valid], dim=-1)
        logq = F.log_softmax(batch.target[valid], dim=-1)
        return F.kl_div(logp, logq, log_target=True, reduction="batchmean")
    s, t = out[:, valid], batch.target[:, valid]  # blocks × tokens × hidden
    var = t.var(dim=(1, 2), keepdim=True).clamp_min(1e-8)
    hidden = (((s - t) ** 2) / var).mean()
    m = batch.mask.unsqueeze(-1).float()
    pool_s = (out[-1] * m).sum(1) / m.sum(1).clamp_min(1)
    pool_t = (batch.target[-1] * m).sum(1) / m.sum(1).clamp_min(1)
    cosine = (1 - F.cosine_similarity(pool_s, pool_t, dim=-1)).mean()
    return hidden + cosine
