"""The learned method block by block: end-to-end importance of every candidate, one global rank choice, block-local fine-tuning.

The whole-model learned method trains scores with the whole student and teacher in memory. Here
no more than one block is ever materialised, in three sweeps over the blocks:

A. forward on the dense stream: XᵀX of each block's inputs, written to a temporary safetensors file
   per block (with `Learned.candidates == "whiten"`: the whitened spectrum's candidates right away,
   `importance.candidate_rank` of them, as stage 1); every block's input is kept (the calibration
   stream, on the CPU).
B. reverse: the gradient of the next-token loss with respect to the last hidden state is pushed
   down through the blocks. Each block first runs dense and collects the Gram matrix of the loss
   gradients at each target's output, and its candidates are the top components of the curvature
   spectrum (`spectra.curvature_spectrum`: K-FAC's G ⊗ A approximation of the Fisher, so the
   truncation drops what the loss needs least); then it runs with its candidates scored (s = 1): a
   score's gradient is then the gradient of the *end-to-end* loss (the chain rule through the later
   blocks is what the pushed gradient carries), and its Fisher estimate Σ_batches (s·∂L/∂s)² is in
   the same units in every block. The dense block's input gradient goes down to the next. One
   global selection (importance per unit cost, `importance.select`) picks every rank.
C. forward on the compressed stream: each block keeps its chosen candidates, and its factors (and
   the targets left dense) are fine-tuned against the dense block's output on the dense stream
   (MSE normalised by the block's own update ‖Y − X‖²), then its compressed output feeds the next.

Then, when memory allows (single-process runs), the assembled model is fine-tuned end to end
against the dense model's next-token distributions, rebuilt from the dense last hidden states kept
from sweep A through the shared final norm and head (`finetune.HiddenTeacher`): no dense model is
ever loaded. On stories260K this stage is what brings the method level with the whole-model one
(5.79 vs 5.72 perplexity; without it 7.42), and on SmolLM2-135M the streamed method beats the
whole-model one (60.7 vs 67.9 at keep 0.8; README, "Real LLMs").

Curvature candidates against whitened ones (stories260K, keep 0.8, 64 windows of the built-in prose,
TinyStories held-out perplexity): 9.01 → 8.22 without fine-tuning, 6.75 → 6.27 with it; on 256
self-sampled stories 8.06 → 6.74 and 5.37 → 5.20 (README, "Real LLMs", has SmolLM2).
Decisions, measured on stories260K at keep 0.8 with a prototype (notes: issue 10 §5): importances
learned per block against the block's own output are not comparable across blocks (global
allocation on them: perplexity 53.9, uniform ranks 23.9); the end-to-end Fisher of the reverse
sweep gave 16.1 without any training, a per-block rescale of the local ones 21.1. Training the
scores block-locally did not help beyond training the factors (7.95 vs 7.99), so this path trains
factors only and ignores `Learned.steps`. Targets from the dense stream beat targets of the dense
block on the compressed input (7.99 vs 9.66).
"""

from __future__ import annotations

import functools
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .calibration import CalibrationBatch
from .checkpoint import Shards
from .costmodel import LayerShape
from .device import calibration_matmuls, resolve_precision, training_forward
from .distributed import Group
from .errors import ConfigError
from .factorize import LayerRecord, LowRankLinear, pivot_layers, replace_with_factors
from .families import Family
from .finetune import KL_CHUNK_TOKENS, HiddenTeacher, MiniBatches, finetune_factors, logit_head, probe_loss
from .importance import ScoredLowRank, candidate_rank, importance_order, select
from .loading import ModelSource, blocks_owner, set_submodule
from .methods import Learned
from .planner import LayerImportance
from .reporting import SILENT, Reporter
from .spectra import curvature_spectrum, factorization_cost, spectra_of
from .statistics import ActivationStats, GradientGramHooks
from .streaming import (
    Laps,
    Stream,
    Streamed,
    available_memory,
    frozen_heap,
    materialize_parameters,
    memory_estimate,
    open_stream,
    release_memory,
    release_parameters,
    run_block,
)
from .weightgrid import on_grid

# Logits of the reverse sweep's first step are made this many bytes at a time (a 262k vocabulary
# times a batch of 128-token windows would otherwise be gigabytes).
LOGITS_CHUNK_BYTES = 1 << 28
# Fixed batches on which each block's local loss is reported before and after fine-tuning.
PROBE_BATCHES = 4
# The end-to-end stage runs when its estimated need is at most this share of the memory available.
END_TO_END_MEMORY_SHARE = 0.5


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def final_norm(model: nn.Module, blocks_name: str, blocks: nn.ModuleList) -> nn.Module:
    """The module between the last block and the head, by structure: the one child with parameters of
    the module holding the blocks that is neither the block list nor the input embedding."""
    owner = blocks_owner(model, blocks_name)
    embedding = model.get_input_embeddings()
    found = [m for m in owner.children()
             if m is not blocks and m is not embedding and any(True for _ in m.parameters())]
    if len(found) != 1:
        raise ConfigError(f"the streamed learned method needs one final norm after the blocks; found "
                          f"{len(found)} modules with weights there: use --stream off or another method")
    return found[0]


class Candidates:
    """Each block's candidate factors (A, B per target) in a temporary folder, one safetensors file
    per block, so that memory holds one block's candidates at a time (and, by kind, each block's XᵀX
    until the reverse sweep and the dense stream: DenseStream)."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="edgesvd-candidates-")
        self.folder = Path(self._dir.name)

    def write(self, i: int, factors: dict[str, torch.Tensor], kind: str = "block") -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in factors.items()}, str(self.folder / f"{kind}-{i:05d}.safetensors"))

    def read(self, i: int, device: torch.device, kind: str = "block") -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.folder / f"{kind}-{i:05d}.safetensors"), device=str(device))

    def remove(self, i: int, kind: str = "block") -> None:
        (self.folder / f"{kind}-{i:05d}.safetensors").unlink(missing_ok=True)

    def write_statistics(self, i: int, stats: ActivationStats) -> ActivationStats:
        """Block i's XᵀX to disk until the reverse sweep needs them; returns the stats without matrices."""
        self.write(i, stats.tensors(), kind="stats")
        return stats.with_tensors({})

    def read_statistics(self, i: int, stats: ActivationStats, device: torch.device) -> ActivationStats:
        return stats.with_tensors(self.read(i, device, kind="stats"))

    def close(self) -> None:
        self._dir.cleanup()


class DenseStream:
    """The dense stream X[0..L] (block i's inputs, per calibration batch, then the last block's outputs)
    in the candidates' folder, one file per boundary: memory holds the boundaries in use, not all L + 1
    (SmolLM2, 232 windows: 31 × 68 MB; Llama-3-8B, 128 windows: 33 × 270 MB). float32, read back exactly."""

    def __init__(self, candidates: Candidates) -> None:
        self._candidates = candidates
        self._count = 0

    def append(self, batches: list[torch.Tensor]) -> None:
        self._candidates.write(self._count, {f"{j:06d}": x.cpu() for j, x in enumerate(batches)}, kind="stream")
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        read = self._candidates.read(i % self._count, torch.device("cpu"), kind="stream")
        return [read[k] for k in sorted(read)]

    def drop(self, i: int) -> None:
        """Boundary i is no longer needed: its file goes."""
        self._candidates.remove(i, kind="stream")


def _release_block(stream: Stream, i: int) -> None:
    block = stream.blocks[i]
    release_parameters(block, [n for n, p in block.named_parameters() if p.device.type != "meta"])


def _block_candidates(model: nn.Module, targets: list[str], stats: ActivationStats, method: Learned,
                      shapes: dict[str, LayerShape], sigma: dict[str, torch.Tensor], group: Group,
                      out_stats: ActivationStats | None = None) -> dict[str, torch.Tensor]:
    """Stage 1 for one block's targets: the top components up to `candidate_rank` as float32 factors
    (`<name>.a`, `<name>.b`, CPU) of the whitened spectrum, or with `out_stats` (the Gram matrices of
    the loss gradients at the targets' outputs) of the curvature spectrum; fills in each target's
    shape and σ. Under torchrun each rank computes its share of the layers and broadcasts them."""
    owner = group.owners({n: factorization_cost(*model.get_submodule(n).weight.shape) for n in targets})
    mine = [n for n in targets if owner[n] == group.rank]
    if out_stats is None:
        computed = spectra_of(model, mine, "whiten", stats)
    else:
        computed = {n: curvature_spectrum(model.get_submodule(n).weight.detach(), stats.gram_for(n),
                                          stats.tokens_for(n), out_stats.gram_for(n)) for n in mine}
    tensors = {}
    for name in targets:
        linear = model.get_submodule(name)
        pivoted = method.form == "pivoted"
        shapes[name] = LayerShape(name, linear.out_features, linear.in_features, linear.bias is not None, pivoted)
        k = candidate_rank(linear.out_features, linear.in_features, method.keep, method.margin, method.rank_multiple,
                           pivoted)
        if name in computed:
            a, b = computed[name].factors(k)
            tensors[name] = [a.float(), b.float(), computed[name].sigma]
        else:
            device = linear.weight.device
            tensors[name] = [torch.empty(k, linear.in_features, device=device),
                             torch.empty(linear.out_features, k, device=device),
                             torch.empty(min(linear.weight.shape), dtype=torch.float64, device=device)]
    group.broadcast_owned(owner, tensors)
    factors = {}
    for name, (a, b, s) in tensors.items():
        factors[f"{name}.a"], factors[f"{name}.b"], sigma[name] = a.cpu(), b.cpu(), s.cpu()
    return factors


def _sweep_dense(stream: Stream, method: Learned, device: torch.device, group: Group, candidates: Candidates,
                 laps: Laps, reporter: Reporter, deferred: dict | None = None
                 ) -> tuple[DenseStream, dict, dict, list[float]]:
    """Sweep A. Returns the dense stream X[0..L] (on disk), every target's shape and whitened σ, and
    each block's mean squared update ‖Y − X‖² per token (the scale of its local loss). With a
    `deferred` dict (curvature candidates), no candidates yet: each block's XᵀX go to disk, what reads
    them back into `deferred`, and sweep B fills in the shapes and (curvature) σ."""
    model = stream.model
    current = [h.cpu() for h in stream.hidden]
    xs = DenseStream(candidates)
    xs.append(current)
    shapes: dict[str, LayerShape] = {}
    sigma: dict[str, torch.Tensor] = {}
    update: list[float] = []
    with reporter.progress("sweep 1/3: statistics and candidates", total=len(stream.blocks)) as bar:
        for i in range(len(stream.blocks)):
            mine = stream.targets_of(i)
            block = stream.materialize(i, device)
            inputs = [x.to(device) for x in current]
            outputs, stats = run_block(block, inputs, stream.arguments[i], stream.masks, mine, stream.prefix(i))
            group.sum_statistics(stats)
            energy = torch.zeros((), dtype=torch.float64, device=device)
            count = torch.zeros((), dtype=torch.float64, device=device)
            for x, y, (_, mask) in zip(inputs, outputs, stream.batches):
                valid = mask.to(device).bool()
                energy += ((y - x)[valid].double() ** 2).sum()
                count += valid.sum()
            group.sum_([energy, count])
            update.append(float(energy / count.clamp_min(1)) or 1.0)
            laps.lap("statistics_s")
            if deferred is not None:  # the candidates wait for the loss gradients of the reverse sweep
                deferred[i] = candidates.write_statistics(i, stats)
            else:
                candidates.write(i, _block_candidates(model, mine, stats, method, shapes, sigma, group))
            del stats, inputs
            current = [y.cpu() for y in outputs]
            xs.append(current)
            del outputs
            _release_block(stream, i)
            laps.lap("factorize_s")
            laps.block_done(device)
            bar.advance()
    return xs, shapes, sigma, update


def _top_gradients(stream: Stream, last: list[torch.Tensor], device: torch.device, group: Group
                   ) -> list[torch.Tensor]:
    """∂(mean next-token cross-entropy over every calibration token of every rank)/∂h_L per batch."""
    model = stream.model
    outside = [n for n, p in model.named_parameters()
               if p.device.type == "meta" and not n.startswith(stream.blocks_name + ".") and n in stream.weights.files]
    materialize_parameters(model, "", stream.weights, device, outside)
    model.tie_weights()
    norm, head = final_norm(model, stream.blocks_name, stream.blocks), model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    count = torch.tensor(float(sum(int(m[:, 1:].sum()) for _, m in stream.batches)), dtype=torch.float64,
                         device=device)  # on the device: nccl reduces only GPU tensors
    group.sum_([count])
    grads = []
    for h_all, (ids, mask) in zip(last, stream.batches):
        rows = max(1, LOGITS_CHUNK_BYTES // (4 * ids.shape[1] * head.weight.shape[0]))
        parts = []
        for r in range(0, ids.shape[0], rows):
            h = h_all[r:r + rows].to(device).requires_grad_(True)
            with torch.enable_grad():
                logits = head(norm(h)).float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                valid = mask[r:r + rows, 1:].to(device).bool()
                loss = F.cross_entropy(logits[:, :-1][valid], ids[r:r + rows, 1:].to(device)[valid],
                                       reduction="sum") / float(count)
                loss.backward()
            parts.append(h.grad.cpu())
        grads.append(torch.cat(parts))
    return grads


def _output_gradient_grams(stream: Stream, i: int, inputs: list[torch.Tensor], grads: list[torch.Tensor],
                           device: torch.device) -> tuple[ActivationStats, list[torch.Tensor]]:
    """Dense block i given ∂L/∂(output) per batch: the Gram matrix Σ gᵀg of the loss gradient at each
    target's output (valid tokens, float64), and ∂L/∂(input) per batch for the block below."""
    block = stream.materialize(i, device)
    hooks = GradientGramHooks(ActivationStats(), {n: stream.model.get_submodule(n) for n in stream.targets_of(i)})
    below = []
    try:
        for b, (args, kwargs) in enumerate(stream.arguments[i]):
            hooks.batch(stream.masks[b])
            x = inputs[b].to(device).detach().requires_grad_(True)
            with torch.enable_grad():
                _output(block(x, *args, **kwargs)).backward(grads[b].to(device))
            below.append(x.grad.cpu())
    finally:
        out_stats = hooks.remove()
    return out_stats, below


def _block_fisher(stream: Stream, i: int, inputs: list[torch.Tensor], grads: list[torch.Tensor],
                  candidates: Candidates, device: torch.device) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Block i with its candidates scored: Σ_batches (s·∂L/∂s)² of this rank's batches given ∂L/∂(output)
    per batch, and ∂L/∂(input) per batch for the block below. The block's dense Linears are put back."""
    model = stream.model
    block = stream.materialize(i, device)
    factors = candidates.read(i, device)
    dense, scored = {}, {}
    for name in stream.targets_of(i):
        linear = model.get_submodule(name)
        dense[name] = linear
        scored[name] = ScoredLowRank(factors[f"{name}.a"], factors[f"{name}.b"],
                                     None if linear.bias is None else linear.bias.detach())
        set_submodule(model, name, scored[name])
    fisher = {n: torch.zeros(s.scores.shape, dtype=torch.float64, device=device) for n, s in scored.items()}
    below = []
    for b, (args, kwargs) in enumerate(stream.arguments[i]):
        x = inputs[b].to(device).detach().requires_grad_(True)  # not the stored tensor: its .grad would pile up
        with torch.enable_grad():
            _output(block(x, *args, **kwargs)).backward(grads[b].to(device))
        for n, layer in scored.items():
            fisher[n] += (layer.scores.detach() * layer.scores.grad).double() ** 2
            layer.scores.grad = None
        below.append(x.grad.cpu())
    for name, linear in dense.items():
        set_submodule(model, name, linear)
    return fisher, below


def _sweep_reverse(stream: Stream, xs: DenseStream, device: torch.device, group: Group,
                   candidates: Candidates, laps: Laps, reporter: Reporter, method: Learned | None = None,
                   deferred: dict[int, ActivationStats] | None = None, shapes: dict | None = None,
                   sigma: dict | None = None) -> dict[str, torch.Tensor]:
    """Sweep B: the end-to-end Fisher importance (float64) of every candidate of every target. With
    `deferred` (curvature candidates), each block first runs dense to collect the Gram matrices of
    the loss gradients at its targets' outputs, makes its candidates from them and its XᵀX, and
    passes the dense block's input gradient down."""
    grads = _top_gradients(stream, xs[-1], device, group)
    laps.lap("importance_s")
    importance: dict[str, torch.Tensor] = {}
    with reporter.progress("sweep 2/3: end-to-end importance", total=len(stream.blocks)) as bar:
        for i in reversed(range(len(stream.blocks))):
            dense_below = None
            inputs = xs[i]
            if deferred is not None:
                out_stats, dense_below = _output_gradient_grams(stream, i, inputs, grads, device)
                group.sum_statistics(out_stats)
                laps.lap("importance_s")
                stats = candidates.read_statistics(i, deferred.pop(i), device)
                candidates.write(i, _block_candidates(stream.model, stream.targets_of(i), stats, method, shapes,
                                                      sigma, group, out_stats))
                del stats, out_stats
                laps.lap("factorize_s")
            fisher, grads = _block_fisher(stream, i, inputs, grads, candidates, device)
            del inputs
            if dense_below is not None:
                grads = dense_below
            group.sum_(list(fisher.values()))
            importance.update({n: f.cpu() for n, f in fisher.items()})
            del fisher
            _release_block(stream, i)
            laps.lap("importance_s")
            laps.block_done(device)
            bar.advance()
    return importance


def _local_loss(block: nn.Module, x: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                arguments: tuple[tuple, dict], scale: float, precision: str = "float32") -> torch.Tensor:
    """Mean over valid tokens of ‖block(x) − target‖², divided by the block's mean update ‖Y − X‖²
    (the block's forward at `precision`, the loss in float32)."""
    args, kwargs = arguments
    valid = mask.bool()
    with training_forward(precision, x.device):
        out = _output(block(x, *args, **kwargs))
    diff = out.float() - target
    return (diff[valid] ** 2).sum(-1).mean() / scale


def _finetune_block(block: nn.Module, params: list[nn.Parameter], xs: list[torch.Tensor], targets: list[torch.Tensor],
                    stream: Stream, i: int, scale: float, steps: int, lr: float, seed: int, device: torch.device,
                    group: Group, precision: str = "float32") -> tuple[float, float]:
    """Adam with a linear decay on `params` (one random calibration batch per step, gradients
    averaged over the ranks, each step's forward at `precision`); returns the probe loss (float32)
    before and after."""
    masks = [m.to(device) for _, m in stream.batches]
    args = stream.arguments[i]
    probe = range(min(PROBE_BATCHES, len(xs)))

    @torch.no_grad()
    def probe_loss() -> float:
        total = torch.tensor([sum(float(_local_loss(block, xs[b].to(device), targets[b].to(device), masks[b],
                                                    args[b], scale)) for b in probe), float(len(probe))],
                             dtype=torch.float64, device=device)
        group.sum_([total])
        return float(total[0] / total[1])

    before = probe_loss()
    if steps and params:
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)
        gen = torch.Generator().manual_seed(seed + i)
        for _ in range(steps):
            b = int(torch.randint(len(xs), (1,), generator=gen))
            with torch.enable_grad():
                loss = _local_loss(block, xs[b].to(device), targets[b].to(device), masks[b], args[b], scale,
                                   precision)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            group.mean_gradients(params)
            opt.step()
            sched.step()
        for p in params:
            p.requires_grad_(False)
    return before, probe_loss()


def _sweep_compressed(stream: Stream, method: Learned, xs: DenseStream, update: list[float],
                      ranks: dict[str, int | None], orders: dict[str, torch.Tensor], sigma: dict[str, torch.Tensor],
                      shapes: dict[str, LayerShape], seed: int, device: torch.device, group: Group,
                      candidates: Candidates, shards: Shards | None, laps: Laps, reporter: Reporter,
                      precision: str = "float32", train_precision: str = "float32"
                      ) -> tuple[list[LayerRecord], dict[str, dict[str, torch.Tensor]], dict[int, list[float]]]:
    """Sweep C: build each block at its ranks, fine-tune it (forward passes at `train_precision`),
    propagate the compressed stream (at `precision`); each finished block joins the result in memory,
    or is written to `shards` and leaves memory."""
    model = stream.model
    records: list[LayerRecord] = []
    entries: dict[str, dict[str, torch.Tensor]] = {}
    local: dict[int, list[float]] = {}
    stream_in = xs[0]
    with reporter.progress("sweep 3/3: fine-tune blocks", total=len(stream.blocks)) as bar:
        for i in range(len(stream.blocks)):
            block = stream.materialize(i, device)
            factors = candidates.read(i, device)
            trained: list[nn.Parameter] = []
            on_grid_layers: list[nn.Module] = []  # the trained layers, as modules
            for name in stream.targets_of(i):
                s, rank = shapes[name], ranks[name]
                records.append(LayerRecord(name, s.in_features, s.out_features, rank, s.bias,
                                           s.pivoted and rank is not None))
                kept = torch.zeros_like(sigma[name])
                if rank is None:
                    kept[:] = 1
                    if method.finetune_dense:
                        trained += list(model.get_submodule(name).parameters())
                        on_grid_layers.append(model.get_submodule(name))
                else:
                    index = orders[name][:rank].sort().values
                    fb, rms = factors[f"{name}.b"][:, index], None
                    if s.pivoted:  # B = U·√σ (Spectrum.factors), so U·σ = B·√σ: Spectrum.output_rms
                        rms = (fb.double() * sigma[name][index].to(fb.device).sqrt()[None, :]).norm(dim=1)
                    # built plain even when pivoted: pivoted factors diverge under fine-tuning (pivot_layers)
                    low = replace_with_factors(model, name, factors[f"{name}.a"][index], fb, False, rms)
                    trained += [low.a.weight, low.b.weight]
                    on_grid_layers.append(low)
                    kept[index] = 1
                entries[name] = {"sigma": sigma[name], "kept": kept}
            del factors
            targets = xs[i + 1]
            # With Learned.quantize_aware the block trains on the grid, and the next block trains
            # against the inputs the quantized model will give it (the grid is left before spilling).
            with on_grid(on_grid_layers, method.quantize_aware):
                before, after = _finetune_block(block, trained, stream_in, targets, stream, i, update[i],
                                                method.finetune_steps, method.finetune_lr, seed, device, group,
                                                train_precision)
                local[i] = [round(before, 5), round(after, 5)]
                del targets
                if shards is not None:  # no end-to-end stage will train this block again
                    pivot_layers(model, [r for r in records if r.name.startswith(stream.prefix(i))])
                bar.describe(f"sweep 3/3: fine-tune blocks · block {i} local loss {before:.4f} → {after:.4f}")
                laps.lap("finetune_s")
                with torch.no_grad(), calibration_matmuls(precision, device):
                    stream_in = [_output(block(x.to(device), *a, **k)).cpu()
                                 for x, (a, k) in zip(stream_in, stream.arguments[i])]
            if i + 1 < len(stream.blocks):  # the last one stays: the end-to-end stage's teacher
                xs.drop(i + 1)  # the dense stream past block i is no longer a target
            if shards is None:
                block.to("cpu")  # the finished block joins the result
            else:
                stream.spill(i, shards)
            laps.lap("propagate_s")
            laps.block_done(device)
            bar.advance()
    return records, entries, local


def end_to_end_bytes(model: nn.Module, trained: int, batch_tokens: int, checkpointing: bool) -> int:
    """Memory the end-to-end stage needs beyond the weights outside the blocks: the `trained`
    parameters (the compressed blocks' factors and, when fine-tuned, the targets left dense) with
    their gradients and Adam's two moments, and one batch's activations kept for backward: about 24
    hidden-sized tensors per block, or with activation checkpointing one per block plus one block's
    24; and one KL chunk's logits, their log-softmax and gradient, the teacher's likewise (finetune._kl_loss)."""
    config = model.config
    blocks = getattr(config, "num_hidden_layers", 1)
    kept = blocks + 24 if checkpointing else 24 * blocks
    activations = 4 * (batch_tokens * kept * config.hidden_size
                       + 6 * min(batch_tokens, KL_CHUNK_TOKENS) * config.vocab_size)
    return 4 * 4 * trained + activations


def _trained_parameters(ranks: dict[str, int | None], shapes: dict[str, LayerShape], method: Learned) -> int:
    """Parameters the end-to-end stage trains once the blocks are built at `ranks`."""
    return sum(s.params(ranks[n]) for n, s in shapes.items() if ranks[n] is not None or method.finetune_dense)


def _plan_end_to_end(model: nn.Module, trained: int, batch_tokens: int, device: torch.device, group: Group,
                     reporter: Reporter) -> dict:
    """Whether the end-to-end stage will run, decided before the blocks are built (a stage that will
    not run needs no finished block in memory): single-process runs only, when its estimate fits
    in END_TO_END_MEMORY_SHARE of the available memory; with activation checkpointing when only that fits."""
    if group.size > 1:
        reporter.info("end-to-end fine-tuning will be skipped: it runs in single-process runs only")
        return {"ran": False, "why": "several processes"}
    free = available_memory(device)
    allowed = float("inf") if free is None else END_TO_END_MEMORY_SHARE * free
    need = {c: end_to_end_bytes(model, trained, batch_tokens, c) for c in (False, True)}
    if need[True] > allowed:
        reporter.info(f"end-to-end fine-tuning will be skipped: it needs about {need[True] / 2**30:.1f} GiB with "
                      f"activation checkpointing, {free / 2**30:.1f} GiB are available")
        return {"ran": False, "why": f"needs {need[True]} bytes, {free} available"}
    checkpointing = need[False] > allowed
    return {"ran": True, "checkpointing": checkpointing, "estimated_bytes": need[checkpointing]}


@contextmanager
def activation_checkpointing(blocks: nn.ModuleList, enabled: bool):
    """Each block recomputes its activations during backward instead of keeping them (torch.utils.checkpoint,
    whatever the model's train/eval mode)."""
    if enabled:
        for block in blocks:
            block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        if enabled:
            for block in blocks:
                del block.forward


def _end_to_end(model: nn.Module, stream: Stream, last_hidden: list[torch.Tensor], method: Learned, steps: int,
                plan: dict, family: Family, seed: int, device: torch.device, reporter: Reporter,
                precision: str = "float32") -> dict:
    """Fine-tune every kept factor (and the targets left dense) of the assembled model against the
    dense model's next-token distributions, rebuilt from its last hidden states, as `plan` says
    (_plan_end_to_end)."""
    if not plan["ran"]:
        return plan
    checkpointing = plan["checkpointing"]
    factored = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    left_dense = ([m for m in map(model.get_submodule, stream.targets) if isinstance(m, nn.Linear)]
                  if method.finetune_dense else [])
    ids = torch.cat([i for i, _ in stream.batches])
    mask = torch.cat([m for _, m in stream.batches])
    model.to(device)
    teacher = HiddenTeacher(ids, mask, torch.cat(last_hidden), final_norm(model, stream.blocks_name, stream.blocks),
                            logit_head(model), family, device)
    batches = MiniBatches(ids.shape[0], method.batch_size, seed)
    probe_gen = MiniBatches(ids.shape[0], method.batch_size, seed + 1)
    probe = [probe_gen.next() for _ in range(min(PROBE_BATCHES, max(1, ids.shape[0] // method.batch_size)))]
    with on_grid(factored + left_dense, method.quantize_aware):  # the losses too: what the export will compute
        before = probe_loss(model, teacher, probe)
        with activation_checkpointing(stream.blocks, checkpointing):
            curve = finetune_factors(model, factored, teacher, steps, method.finetune_lr, batches, reporter,
                                     dense=left_dense, precision=precision)
        after = probe_loss(model, teacher, probe)
    model.cpu()
    return {"ran": True, "steps": steps, "checkpointing": checkpointing, "kl_before": round(before, 6),
            "kl_after": round(after, 6), "curve": [round(v, 5) for v in curve[:: max(1, len(curve) // 20)]],
            "estimated_bytes": plan["estimated_bytes"]}


def _block_keeps(records: list[LayerRecord], stream: Stream) -> list[float]:
    keeps = []
    for i in range(len(stream.blocks)):
        mine = [r for r in records if r.name.startswith(stream.prefix(i))]
        before = sum(r.params_before for r in mine)
        keeps.append(round(sum(r.params_after for r in mine) / before, 4) if before else 1.0)
    return keeps


def compress_learned_blocks(source: ModelSource, method: Learned, calib: CalibrationBatch,
                            exclude: tuple[str, ...] = (), device: torch.device = torch.device("cpu"),
                            batch_size: int = 16, reporter: Reporter = SILENT, group: Group = Group(),
                            precision: str = "auto") -> Streamed:
    """The learned method on `source` one block at a time (see the module docstring): every Linear
    inside a block, less `exclude`, at `method.keep` of their parameters in total. Each of the
    `batch_size`-sequence calibration batches is one fine-tuning step's batch; `method.finetune_steps`
    left None comes from the family's recipe within the work cap (Learned.resolved), per block.
    `precision` (edgesvd.device.PRECISIONS): of the passes that train nothing (sweeps A and B, the
    propagation of sweep C); `method.train_precision`: of the fine-tuning steps' forward passes (their
    weights, gradients and optimizer states in float32); spectra, pivoting and the rank choice in float64."""
    if not isinstance(method, Learned):
        raise ConfigError(f"compress_learned_blocks runs the learned method, not '{method.name}'")
    precision = resolve_precision(precision, device)
    train_precision = resolve_precision(method.train_precision, device, "--train-precision")
    laps = Laps()
    stream = open_stream(source, method, calib, exclude, device, batch_size, group)
    model = stream.model
    n, seq_len = calib.input_ids.shape
    targeted = sum(model.get_submodule(t).weight.numel() for t in stream.targets)
    # Stage 3's steps fine-tune each block and then the whole model, so the work cap counts them twice
    # (SmolLM2: 23 steps each, where 46 measured no better: README, "bfloat16 fine-tuning"). No scores
    # are trained (`steps` is unused): spending stage 2's steps end to end
    # instead measured no better (stories260K keep 0.8, 64 sequences: 9.47 vs 9.48).
    if method.steps:
        reporter.info("the streamed learned method learns importance in one reverse sweep: --steps is not used")
    method = replace(method, steps=0, batch_size=batch_size).resolved(source.family, targeted, n, seq_len,
                                                                      model.config.hidden_size, finetune_passes=2)
    method = replace(method, form="pivoted" if method.pivoted(source.family) else "plain")
    end_to_end_steps = method.finetune_steps
    laps.lap("load_s")
    estimate = memory_estimate(model, stream.blocks, stream.targets, method.keep, stream.tokens, stream.widest_batch)
    hidden = model.config.hidden_size
    estimate["calibration_stream"] = 4 * stream.tokens * hidden * 3  # the rest on disk (DenseStream)
    estimate["total"] += estimate["calibration_stream"]
    if method.candidates == "curvature":  # a block's loss-gradient Gram matrices beside its XᵀX (float64)
        estimate["output_statistics"] = 8 * sum(model.get_submodule(t).out_features ** 2 for t in stream.targets_of(0))
        estimate["total"] += estimate["output_statistics"]
    reporter.step(f"streamed learned: {len(stream.blocks)} blocks of {source.name}, three sweeps, "
                  f"{method.finetune_steps} fine-tuning steps per block, {end_to_end_steps} end to end "
                  f"(tensors at the peak ≈ "
                  f"{estimate['total'] / 2**30:.2f} GiB)")
    with frozen_heap():
        candidates = Candidates()
        try:
            with calibration_matmuls(precision, device):
                deferred: dict[int, ActivationStats] | None = {} if method.candidates == "curvature" else None
                xs, shapes, sigma, update = _sweep_dense(stream, method, device, group, candidates, laps, reporter,
                                                         deferred)
                importance = _sweep_reverse(stream, xs, device, group, candidates, laps, reporter, method,
                                            deferred, shapes, sigma)
            layers = [LayerImportance(shapes[n], importance[n].sort(descending=True).values.numpy())
                      for n in stream.targets]
            total_dense = sum(s.params(None) for s in shapes.values())
            ranks = select(layers, method.keep * total_dense, total_dense, method.rank_multiple, method.selection)
            orders = {n: importance_order(importance[n]) for n in stream.targets}
            seed = int(calib.summary.get("seed", 0))
            plan = _plan_end_to_end(model, _trained_parameters(ranks, shapes, method), method.batch_size * seq_len,
                                    device, group, reporter)
            # Without an end-to-end stage no finished block is needed again: each goes to disk as it is done.
            shards = None if plan["ran"] else Shards(len(stream.blocks) + 1)
            records, entries, local = _sweep_compressed(stream, method, xs, update, ranks, orders, sigma, shapes, seed,
                                                        device, group, candidates, shards, laps, reporter, precision,
                                                        train_precision)
            last_hidden = xs[-1]
        finally:
            candidates.close()
    stream.hidden = stream.arguments = None
    del xs
    model = stream.finish(shards)
    laps.lap("load_s")
    release_memory(device)
    end_to_end = _end_to_end(model, stream, last_hidden, method, end_to_end_steps, plan, source.family, seed, device,
                             reporter, train_precision)
    if plan["ran"]:
        pivot_layers(model, records)
    del last_hidden
    laps.lap("end_to_end_s")
    release_memory(device)
    details = {"streamed": True, "propagate": "compressed", "blocks": len(stream.blocks), "ranks": group.size,
               "calibration_precision": precision, "training_precision": train_precision,
               "learned": asdict(method), "importance": "end-to-end Fisher through a reverse sweep",
               "block_steps": method.finetune_steps, "keep_per_block": _block_keeps(records, stream),
               "local_loss": local, "end_to_end": end_to_end, **laps.details(), "memory_estimate_bytes": estimate}
    return Streamed(model, records, entries, details, shards)
