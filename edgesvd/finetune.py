"""Distillation against the dense model: teacher targets, the student loss, and fine-tuning the kept factors."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .calibration import CalibrationBatch
from .device import training_forward
from .errors import ConfigError
from .evaluate import mean_pool
from .factorize import LowRankLinear
from .families import Family
from .loading import blocks_owner, find_blocks
from .reporting import SILENT, Reporter
from .weightgrid import trainable_weight

# Teacher outputs (encoders: every block's hidden states; decoders: the final ones) are cached for the
# whole calibration set when they fit in this many bytes; otherwise the teacher runs again on every batch.
CACHE_LIMIT_BYTES = 1 << 30
# Decoders' next-token KL is summed over chunks of this many tokens, each chunk's logits recomputed
# during backward (torch.utils.checkpoint) instead of kept: a batch's logits, their log-softmax and
# gradients are each tokens × vocabulary floats (SmolLM2, 16 × 128 tokens: 0.4 GB apiece). One
# end-to-end step of SmolLM2 peaked at 6.58 GB with them and peaks at 4.23 GB in chunks, with the same
# loss and gradients, about 8 % slower (the head runs twice): samples/bench_distill_memory.py.
KL_CHUNK_TOKENS = 256


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # No KV cache: nothing generates here, and a recomputed (checkpointed) block would append twice.
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _outputs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, family: Family) -> torch.Tensor:
    """What the loss compares: logits for causal LMs; every block's hidden state (stacked on
    dim 0, embeddings excluded) for encoders."""
    if family.causal:
        return _logits(model, ids, mask)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return torch.stack(out.hidden_states[1:])


class LogitHead(nn.Module):
    """A causal LM's last step: final (normed) hidden states → logits, soft-capped where the model's
    config says so (Gemma 2/3), in float32."""

    def __init__(self, head: nn.Module, softcap: float | None = None) -> None:
        super().__init__()
        self.head, self.softcap = head, softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits


def logit_head(model: nn.Module) -> LogitHead:
    """The output embedding of `model` with its config's soft-cap."""
    return LogitHead(model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None))


def _blocks_owner(model: nn.Module) -> nn.Module | None:
    """The module holding the model's blocks, found by structure; None when it has no list of blocks."""
    try:
        blocks_name, _ = find_blocks(model)
    except ConfigError:
        return None
    return blocks_owner(model, blocks_name)


# Per model: the module holding its blocks, whose first output is the final (normed) hidden state, and
# the LogitHead that turns that state into the model's logits; None where that does not hold.
_SPLITS: "weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, LogitHead] | None]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def _split(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[nn.Module, LogitHead] | None:
    """(body, head) with head(body(x)[0]) = the model's logits, checked once per model on a few tokens, so
    that an architecture that does more after its head (a scale, a bias) keeps the full-logits loss
    instead of training against the wrong logits."""
    if model not in _SPLITS:
        body, head, split = _blocks_owner(model), logit_head(model), None
        if body is not None:
            device = next(model.parameters()).device  # the calibration set may still be on the CPU
            ids, mask = ids[:1, :8].to(device), mask[:1, :8].to(device)
            full = _logits(model, ids, mask).float()
            mine = head(body(input_ids=ids, attention_mask=mask, use_cache=False)[0])
            if full.shape == mine.shape and torch.allclose(full, mine, rtol=1e-4, atol=1e-4):
                split = (body, head)
        _SPLITS[model] = split
    return _SPLITS[model]


@dataclass
class Batch:
    """One training batch: token ids, attention mask (trimmed to its longest row) and teacher targets.
    Where `head` is set, `target` holds the teacher's final hidden states and `head` maps them to its
    logits (computed chunk by chunk, never all at once)."""

    ids: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor] | None = None


class Teacher:
    """The dense model's outputs on the calibration set, cached when small enough.

    Build it before the model is factorized. Caching once saves one forward pass per training
    step; the cache is float32 on the compression device. A decoder's outputs are its final hidden
    states, which a frozen copy of its head turns into logits chunk by chunk (_kl_loss): tokens ×
    hidden floats instead of tokens × vocabulary (stories260K: 67 MB instead of 537 MB), and the
    copy stays the dense head even where the head is itself compressed or fine-tuned (`--include`).
    """

    def __init__(self, model: nn.Module, calib: CalibrationBatch, family: Family, device: torch.device,
                 batch_size: int = 16) -> None:
        self.model, self.calib, self.family, self.device = model, calib, family, device
        n, length = calib.input_ids.shape
        self.head: LogitHead | None = None
        split = _split(model, calib.input_ids, calib.attention_mask) if family.causal else None
        self._body = split[0] if split else None
        if split:
            self.head = LogitHead(copy.deepcopy(split[1].head), split[1].softcap)
        # Encoders' outputs are blocks × batch × tokens × hidden, decoders' batch × tokens × (hidden or vocab).
        self._batch_dim = 0 if family.causal else 1
        probe = self._run(calib.input_ids[:1], calib.attention_mask[:1])
        per_token = probe.numel() // probe.shape[self._batch_dim + 1]
        self.cache: torch.Tensor | None = None
        if n * length * per_token * 4 <= CACHE_LIMIT_BYTES:
            for index in calib.index_batches(batch_size, by_length=True):  # little padding to compute
                out = self._run(*calib.rows(index))
                if self.cache is None:
                    shape = list(out.shape)
                    shape[self._batch_dim], shape[self._batch_dim + 1] = n, length
                    self.cache = out.new_zeros(shape)
                self._tokens(self.cache, out.shape[self._batch_dim + 1]).index_copy_(
                    self._batch_dim, index.to(out.device), out)
            self.model = self._body = None  # the cache replaces the teacher
        else:
            # The caller goes on to factorize `model` in place, so the teacher needs its own copy.
            self.model = copy.deepcopy(model)
            if self._body is not None:
                self._body = _blocks_owner(self.model)  # the same structure, checked on the original

    @torch.no_grad()
    def _run(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ids, mask = ids.to(self.device), mask.to(self.device)
        if self._body is not None:
            return self._body(input_ids=ids, attention_mask=mask, use_cache=False)[0].float()
        return _outputs(self.model, ids, mask, self.family).float()

    def _tokens(self, outputs: torch.Tensor, width: int) -> torch.Tensor:
        """The first `width` token positions of teacher outputs (a view)."""
        return outputs.narrow(self._batch_dim + 1, 0, width)

    def batch(self, index: torch.Tensor) -> Batch:
        """Sequences `index` of the calibration set with their teacher targets, padding trimmed."""
        ids, mask = self.calib.rows(index)
        ids, mask = ids.to(self.device), mask.to(self.device)
        if self.cache is None:
            target = self._run(ids, mask)
        else:
            target = self._tokens(self.cache.index_select(self._batch_dim, index.to(self.cache.device)), ids.shape[1])
        return Batch(ids, mask, target, self.head)


class HiddenTeacher:
    """Teacher targets of a decoder whose dense model is no longer in memory: the dense model's last
    hidden states (N × T × hidden, kept by the streamed path) through the final norm and head, which
    the student shares frozen, computed per batch. Same interface as Teacher."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_hidden: torch.Tensor,
                 norm: nn.Module, head: LogitHead, family: Family, device: torch.device) -> None:
        self.input_ids, self.attention_mask, self.last_hidden = input_ids, attention_mask, last_hidden
        self.norm, self.head, self.family, self.device = norm, head, family, device
        self.cache = None

    @torch.no_grad()
    def batch(self, index: torch.Tensor) -> Batch:
        hidden = self.norm(self.last_hidden[index].to(self.device))
        return Batch(self.input_ids[index].to(self.device), self.attention_mask[index].to(self.device), hidden,
                     self.head)


def _kl_chunk(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, target: torch.Tensor,
              target_head: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Σ over these tokens of KL(teacher ‖ student): the student's logits head(hidden), the teacher's
    target_head(target), or `target` itself when there is no target_head."""
    logp = F.log_softmax(head(hidden), dim=-1)
    with torch.no_grad():
        logq = F.log_softmax(target_head(target) if target_head else target.float(), dim=-1)
    return F.kl_div(logp, logq, log_target=True, reduction="sum")


def _kl_loss(model: nn.Module, batch: Batch, precision: str = "float32") -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions, mean over tokens, summed chunk by chunk
    (KL_CHUNK_TOKENS) from the student's final hidden states where its logits are its head's."""
    valid = batch.mask.bool()
    target = batch.target[valid]
    split = _split(model, batch.ids, batch.mask)
    if split is None:
        with training_forward(precision, batch.ids.device):
            out = _logits(model, batch.ids, batch.mask)
        out = out.float()[valid]
        return _kl_chunk(nn.Identity(), out, target, batch.head) / out.shape[0]
    body, head = split
    with training_forward(precision, batch.ids.device):  # the blocks; the head and the KL in float32
        hidden = body(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)[0]
    hidden = hidden.float()[valid]
    total = sum(checkpoint(_kl_chunk, head, hidden[i:i + KL_CHUNK_TOKENS], target[i:i + KL_CHUNK_TOKENS],
                           batch.head, use_reentrant=False)
                for i in range(0, hidden.shape[0], KL_CHUNK_TOKENS))
    return total / hidden.shape[0]


def _hidden_loss(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per block, MSE of hidden states normalised by the teacher's per-block variance (so every
    block weighs the same), plus 1 − cosine of the mean-pooled last hidden states (the sentence
    embedding a retrieval or STS user consumes)."""
    valid = batch.mask.bool()
    s, t = out[:, valid], batch.target[:, valid]  # blocks × tokens × hidden
    var = t.var(dim=(1, 2), keepdim=True).clamp_min(1e-8)
    hidden = (((s - t) ** 2) / var).mean()
    cosine = (1 - F.cosine_similarity(mean_pool(out[-1], batch.mask), mean_pool(batch.target[-1], batch.mask),
                                      dim=-1)).mean()
    return hidden + cosine


def distill_loss(model: nn.Module, batch: Batch, family: Family, precision: str = "float32") -> torch.Tensor:
    """Student-vs-teacher loss on one batch (padding excluded): KL for causal LMs (their blocks' forward
    at `precision`, edgesvd.device.training_forward), hidden states and the pooled embedding for encoders."""
    if family.causal:
        return _kl_loss(model, batch, precision)
    return _hidden_loss(_outputs(model, batch.ids, batch.mask, family).float(), batch)


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
                     batches: MiniBatches, reporter: Reporter = SILENT, dense: list[nn.Linear] = (),
                     precision: str = "float32") -> list[float]:
    """Train the factors A and B of `factored`, and the weights and biases of the `dense` Linears
    (targets the selection left dense), against the teacher with Adam and a linear decay, each step's
    forward at `precision`; everything else stays frozen. Returns the loss per step."""
    params = [trainable_weight(m) for layer in factored for m in (layer.a, layer.b)]
    params += [p for layer in dense for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / max(1, steps))
    losses = []
    with reporter.progress("stage 3: fine-tune factors", total=steps) as bar:
        for _ in range(steps):
            loss = distill_loss(model, teacher.batch(batches.next()), teacher.family, precision)
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
