"""compress(model, method): load → calibrate → statistics → spectra → importance → ranks → factors → fine-tune.

The public verb of the core, in the style of `quantize_(model, config)`: a method is a small
config (`Plain`, `Asvd`, `Whiten`, `Learned`, from edgesvd.methods), and the result (`Compressed`) holds the compressed
model in memory, the record that goes into the checkpoint, and — for the whitened and learned
methods — the component importance that `deploy` uses to plan other ranks for other devices.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .calibration import BUILTIN, SELF, CalibrationBatch, CalibrationConfig, calibration_config, sample_calibration
from .checkpoint import CompressionRecord, Shards, library_versions, save_compressed
from .costmodel import LayerShape
from .device import check_precision, resolve_device
from .distributed import join, launched, local_device
from .errors import ConfigError
from .factorize import LayerRecord, apply_ranks, pivot_layers
from .finetune import MiniBatches, Teacher, finetune_factors, probe_loss
from .importance import (
    ScoredLowRank,
    attach_scores,
    importance_order,
    layer_shape,
    learn_scores,
    learned_importances,
    scored_importances,
    select,
    whitened_importances,
)
from .loading import (
    DEFAULT_MODEL,
    ModelSource,
    load_model,
    load_tokenizer,
    resolve_model,
    select_targets,
    set_submodule,
)
from .methods import DEFAULT_METHOD, Learned, Method, Whiten, method_config
from .planner import LayerImportance, check_rank_multiple, uniform_rank
from .reporting import SILENT, Reporter
from .spectra import Spectrum, curvature_spectrum, spectra_of
from .statistics import ActivationStats, collect_output_gradients, collect_statistics
from .streaming import LazyWeights, compress_blocks, materialize_parameters, parameter_count, use_streaming
from .streaming_learned import compress_learned_blocks
from .weightgrid import on_grid


# -- the model prepared for compression --------------------------------------------------------------
@dataclass
class Prepared:
    """A loaded model with its targets, calibration sample and statistics."""

    source: ModelSource
    model: nn.Module
    tokenizer: object
    targets: list[str]
    calib: CalibrationBatch | None
    stats: ActivationStats | None
    device: torch.device
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    @property
    def seed(self) -> int:
        """Calibration sampling and training seed."""
        return self.calibration.seed


def _check_positions(config, seq_len: int) -> None:
    """Calibration sequences must fit the model: past its learned positions it fails (or, with
    rotary positions, runs where it was never trained)."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and 0 < limit < seq_len:
        raise ConfigError(f"calibration length {seq_len} (--calib-len) exceeds the model's {limit} positions "
                          f"(max_position_embeddings): use --calib-len {limit} or less")


def prepare(model: str | os.PathLike | ModelSource = DEFAULT_MODEL,
            calib: CalibrationConfig | str | Sequence[str] | None = None, include: Sequence[str] = (),
            exclude: Sequence[str] = (), device: str = "auto", batch_size: int = 16, trust_remote_code: bool = False,
            need_stats: bool = True, reporter: Reporter = SILENT, rank_multiple: int | None = None,
            form: str | None = None) -> Prepared:
    """Load the model and tokenizer, pick targets, sample calibration data, collect XᵀX; with
    `rank_multiple`, refuse one no targeted layer can be factorized at in `form` (None: the
    family's) before any calibration."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    calib = calibration_config(calib)
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    torch_device = resolve_device(device)
    loaded = load_model(source, trust_remote_code).to(torch_device)
    tokenizer = load_tokenizer(source.path, trust_remote_code)
    targets = select_targets(loaded, include, exclude)
    if rank_multiple is not None:
        check_rank_multiple({t: tuple(loaded.get_submodule(t).weight.shape) for t in targets}, rank_multiple,
                            (form or source.family.form) == "pivoted")
    sample = stats = None
    if need_stats:
        _check_positions(loaded.config, calib.seq_len)
        sample = sample_calibration(tokenizer, calib, source.family, loaded)
        stats = collect_statistics(loaded, targets, sample, batch_size, reporter)
    return Prepared(source, loaded, tokenizer, targets, sample, stats, torch_device, calib)


# -- the learned method's stages -------------------------------------------------------------------
@dataclass
class LearnedState:
    """Stages 1–2 done: `model` holds scored layers; stage 3 can finish it for any rank plan.

    `dense` holds the original Linears (frozen, shared by every finished copy), `spectra` their
    whitened spectra, `scored` the scored layers inside `model`.
    """

    model: nn.Module
    targets: list[str]
    dense: dict[str, nn.Linear]
    spectra: dict[str, Spectrum]
    scored: dict[str, ScoredLowRank]
    teacher: Teacher
    probe: list[torch.Tensor]
    stage2_batches: MiniBatches
    method: Learned
    keep: float
    losses: dict[str, float]
    curve2: list[float]
    timings: dict[str, float]
    pivoted: bool = False

    @property
    def shapes(self) -> dict[str, LayerShape]:
        return {n: layer_shape(self.dense[n], n, self.pivoted) for n in self.targets}

    @property
    def total_dense(self) -> int:
        return sum(l.weight.numel() for l in self.dense.values())

    def batches(self) -> MiniBatches:
        """Stage 3's mini-batches: stage 2's sequence continued, the same for every finished copy."""
        return copy.deepcopy(self.stage2_batches)


def learn_importance(prepared: Prepared, method: Learned, reporter: Reporter = SILENT,
                     spectra: dict[str, Spectrum] | None = None) -> LearnedState:
    """Stages 1 and 2 on `prepared.model` in place: candidates from the curvature or the whitened
    spectra (`method.candidates`), then scores learned while pruning gradually down to `method.keep`
    of the targeted parameters. `spectra`: the targets' whitened spectra when the caller has them
    already (saves one SVD per layer; unused for curvature candidates)."""
    torch.manual_seed(prepared.seed)
    model, family, stats = prepared.model, prepared.source.family, prepared.stats
    if stats is None or prepared.calib is None:
        raise ConfigError("method 'learned' needs calibration statistics")
    n, seq_len = prepared.calib.input_ids.shape
    targeted = sum(model.get_submodule(t).weight.numel() for t in prepared.targets)
    method = method.resolved(family, targeted, n, seq_len, model.config.hidden_size)
    pivoted = method.pivoted(family)
    for p in model.parameters():
        p.requires_grad_(False)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    teacher = Teacher(model, prepared.calib, family, prepared.device)
    timings["teacher_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if method.candidates == "curvature":
        out_stats = collect_output_gradients(model, prepared.targets, prepared.calib, family.causal, method.batch_size,
                                             prepared.seed, reporter)
        # A decoder's G sums one gradient per token of a real loss (tens of thousands ≫ out); an encoder's
        # sums random projections, an estimate that is shrunk when few tokens make it (curvature_spectrum).
        spectra = {t: curvature_spectrum(model.get_submodule(t).weight.detach(), stats.gram_for(t), stats.tokens_for(t),
                                         out_stats.gram_for(t), None if family.causal else out_stats.tokens_for(t))
                   for t in prepared.targets}
        del out_stats
    else:
        spectra = dict(spectra or {})
        missing = [t for t in prepared.targets if t not in spectra]
        spectra.update(spectra_of(model, missing, "whiten", stats))
        spectra = {t: spectra[t] for t in prepared.targets}
    dense, scored = attach_scores(model, spectra, method.keep, method.margin, method.rank_multiple, reporter,
                                  pivoted)
    timings["stage1_s"] = time.perf_counter() - t0

    batches = MiniBatches(n, method.batch_size, prepared.seed)
    probe_gen = MiniBatches(n, method.batch_size, prepared.seed + 1)
    probe = [probe_gen.next() for _ in range(min(4, max(1, n // method.batch_size)))]
    losses: dict[str, float] = {"stage1": probe_loss(model, teacher, probe)}

    t0 = time.perf_counter()
    shapes = {name: layer_shape(dense[name], name, pivoted) for name in prepared.targets}
    total_dense = sum(s.params(None) for s in shapes.values())
    curve2 = learn_scores(model, scored, shapes, teacher, method.keep * total_dense, method.rank_multiple,
                          method.steps, method.lr, batches, method.budget_weight, method.max_score,
                          method.selection, reporter)
    timings["stage2_s"] = time.perf_counter() - t0
    losses["before_switch"] = probe_loss(model, teacher, probe)
    return LearnedState(model, list(prepared.targets), dense, spectra, scored, teacher, probe, batches, method,
                        method.keep, losses, curve2, timings, pivoted)


def finish(state: LearnedState, plan: "Plan", model: nn.Module | None = None, reporter: Reporter = SILENT
           ) -> tuple[nn.Module, list[LayerRecord], dict[str, dict[str, torch.Tensor]], dict]:
    """Stage 3 for one rank plan: keep each layer's first `rank` candidates of the plan's orders,
    fold its scores into their factors, fine-tune the factors.

    Works on `model` (a copy of `state.model`, so one learning pass can finish several plans) or
    on `state.model` itself. Returns the model, the per-layer records (None = left dense), the
    spectra (`sigma`, `scores`, `kept` over the full whitened spectrum) and the details.
    """
    model = state.model if model is None else model
    method = state.method
    t0 = time.perf_counter()
    for name in state.targets:
        # Back to dense first (it stays so where the plan says None); a copy gets its own Linear,
        # so moving one finished model between devices, or fine-tuning a layer left dense, leaves
        # the shared originals alone.
        linear = state.dense[name]
        own = model is not state.model or method.finetune_dense
        set_submodule(model, name, copy.deepcopy(linear) if own else linear)
    records, entries, factored = apply_ranks(model, state.spectra, plan.ranks, plan.orders, plan.scores,
                                             state.pivoted, pivot_later=True)
    left_dense = ([m for m in map(model.get_submodule, state.targets) if isinstance(m, nn.Linear)]
                  if method.finetune_dense else [])
    losses = dict(state.losses)
    losses["after_switch"] = probe_loss(model, state.teacher, state.probe)
    with on_grid(factored + left_dense, method.quantize_aware):  # the loss too: what the export will compute
        curve3 = (finetune_factors(model, factored, state.teacher, method.finetune_steps, method.finetune_lr,
                                   state.batches(), reporter, dense=left_dense)
                  if method.finetune_steps and (factored or left_dense) else [])
        if method.quantize_aware is not None:
            losses["after_finetune_on_grid"] = probe_loss(model, state.teacher, state.probe)
    pivot_layers(model, records)
    losses["after_finetune"] = probe_loss(model, state.teacher, state.probe)
    timings = {**state.timings, "stage3_s": time.perf_counter() - t0}
    details = {
        "learned": asdict(method),
        "importance_keep": state.keep,
        "losses": {k: round(v, 6) for k, v in losses.items()},
        "stage2_curve": [round(v, 5) for v in state.curve2[:: max(1, len(state.curve2) // 20)]],
        "stage3_curve": [round(v, 5) for v in curve3[:: max(1, len(curve3) // 20)]],
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "teacher_cached": state.teacher.cache is not None,
    }
    return model, records, entries, details


# -- component importance: one pass, any rank plan ---------------------------------------------------
@dataclass
class Plan:
    """Per-layer ranks (None: dense), the component order each layer keeps a prefix of, and the
    learned scores to fold (None for whitened plans)."""

    ranks: dict[str, int | None]
    orders: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor] | None = None


@dataclass
class ComponentImportance:
    """One importance pass shared by every rank plan: what the planner ranks, and how a plan
    becomes a model.

    'whiten': components ordered by whitened σ²; a plan is cut from the spectra of a dense copy.
    'learned': components ordered by learned importance along the pruning path; a plan is
    finished by stage 3 of the learned method (scores folded, factors fine-tuned) on a copy.
    """

    method: str
    layers: list[LayerImportance]      # per target, for the planner
    orders: dict[str, torch.Tensor]    # component indices, most important first
    dense: nn.Module                   # the dense model on the CPU (whitened cuts, quality reference)
    spectra: dict[str, Spectrum]       # whitened spectra of every target
    state: LearnedState | None = None  # 'learned'
    scores: dict[str, torch.Tensor] | None = None
    pivoted: bool = False              # the form plans are built in

    def plan(self, ranks: dict[str, int | None]) -> Plan:
        """A plan for `ranks` in the planner's component order."""
        return Plan(ranks, self.orders, self.scores)

    def at_keep(self, keep: float, multiple: int) -> Plan:
        """The plan that keeps `keep` of the targeted parameters: the learned method's final
        global selection (current importance, as stage 2 left it), or uniform whitened ranks."""
        if self.state is None:
            ranks = {l.shape.name: uniform_rank(l.shape.out_features, l.shape.in_features, keep, multiple,
                                                self.pivoted) for l in self.layers}
            return self.plan(ranks)
        state = self.state
        layers = scored_importances(state.scored, state.shapes)
        ranks = select(layers, keep * state.total_dense, state.total_dense, multiple, state.method.selection)
        orders = {n: importance_order(layer.importance) for n, layer in state.scored.items()}
        scores = {n: layer.kept_scores() for n, layer in state.scored.items()}
        return Plan(ranks, orders, scores)

    def build(self, plan: Plan, reporter: Reporter = SILENT
              ) -> tuple[nn.Module, list[LayerRecord], dict[str, dict[str, torch.Tensor]], dict]:
        """The compressed model (CPU, eval mode) for one plan, its layer records, spectrum entries
        and details."""
        if self.state is None:
            model = copy.deepcopy(self.dense)
            records, entries, _ = apply_ranks(model, self.spectra, plan.ranks, plan.orders, pivoted=self.pivoted)
            return model.eval(), records, entries, {}
        model, records, entries, details = finish(self.state, plan, copy.deepcopy(self.state.model), reporter)
        return model.cpu().eval(), records, entries, details


def importance_pass(prepared: Prepared, method: Method, spectra: dict[str, Spectrum] | None = None,
                    dense: nn.Module | None = None, reporter: Reporter = SILENT) -> ComponentImportance:
    """Whitened spectra of every target (the learned method's when its candidates are whitened) and,
    for the learned method, stages 1–2 (which change
    `prepared.model` in place: a dense copy is kept on the CPU). `spectra` and `dense`: what an
    earlier pass over the same prepared model already has."""
    if not isinstance(method, (Whiten, Learned)):
        raise ConfigError(f"component importance comes from the whiten or learned method, not '{method.name}'")
    if isinstance(method, Whiten) or method.candidates_for(prepared.source.family) == "whiten":
        missing = [t for t in prepared.targets if t not in (spectra or {})]
        spectra = {**(spectra or {}), **spectra_of(prepared.model, missing, "whiten", prepared.stats, reporter)}
        spectra = {t: spectra[t] for t in prepared.targets}
    dense = dense if dense is not None else copy.deepcopy(prepared.model).cpu().eval()
    pivoted = method.pivoted(prepared.source.family)
    if isinstance(method, Whiten):
        layers, orders = whitened_importances(dense, spectra, pivoted)
        return ComponentImportance("whiten", layers, orders, dense, {k: s.cpu() for k, s in spectra.items()},
                                   pivoted=pivoted)
    state = learn_importance(prepared, method, reporter, spectra)
    layers, orders, scores = learned_importances(state.scored, state.shapes)
    return ComponentImportance("learned", layers, orders, dense, state.spectra, state=state, scores=scores,
                               pivoted=pivoted)


# -- compress ------------------------------------------------------------------------------------------
@dataclass
class Compressed:
    """What `compress` returns: the compressed model in memory (CPU, eval mode), its tokenizer, the
    checkpoint record and spectrum entries, the source, and — for 'whiten' and 'learned' — the
    component importance `deploy` plans other devices from. A streamed compression keeps its
    finished blocks on disk (`shards`): `model` reads them back when first asked for, `save` links
    them into the checkpoint without reading them."""

    _model: nn.Module | None  # None when made only to be planned per device (see compress_prepared)
    tokenizer: object
    record: CompressionRecord
    spectra: dict[str, dict[str, torch.Tensor]]
    source: ModelSource
    importance: ComponentImportance | None = field(default=None, repr=False)
    calibration: CalibrationConfig | None = None
    writer: bool = True  # False on the ranks other than 0 of a torchrun launch: they write nothing
    shards: Shards | None = field(default=None, repr=False)

    @property
    def model(self) -> nn.Module | None:
        model = self._model
        if self.shards is not None and model is not None:
            names = [n for n, p in model.named_parameters() if p.device.type == "meta" and n in self.shards.weight_map]
            if names:
                self.shards.write_index(self.shards.folder)
                materialize_parameters(model, "", LazyWeights(self.shards.folder), torch.device("cpu"), names)
                model.tie_weights()
        return model

    @property
    def family(self):
        return self.source.family

    def save(self, out: str | os.PathLike, force: bool = False) -> Path:
        """Write the checkpoint folder (config.json with an `edgesvd` section, model.safetensors or its
        parts and index, spectrum.safetensors, tokenizer) atomically."""
        return save_compressed(self._model, self.tokenizer, self.record, out, self.spectra, force=force,
                               shards=self.shards)


def _record(prepared: Prepared, method: Method, layers: list[LayerRecord], details: dict, model_ref: str
            ) -> CompressionRecord:
    return CompressionRecord(
        method=method.name, keep_requested=method.keep, family=prepared.source.family.name,
        source_model=model_ref, layers=layers, rank_multiple=method.rank_multiple,
        calibration=prepared.calib.summary if prepared.calib is not None else {},
        details=details, versions=library_versions())


def compress_prepared(prepared: Prepared, method: Method, model_ref: str | None = None,
                      importance: ComponentImportance | None = None, build: bool = True,
                      reporter: Reporter = SILENT) -> Compressed:
    """Compress a prepared model with `method` (its model is changed in place). `importance`: a
    pass already made for this model (whiten or learned), reused instead of a new one. Without
    `build` nothing is built at `method.keep` (a run that plans every device from the importance
    does not need it): the result has no model and records no layers."""
    start = time.perf_counter()
    model_ref = model_ref or prepared.source.name
    if isinstance(method, (Whiten, Learned)):
        importance = importance or importance_pass(prepared, method, reporter=reporter)
        if build:
            model, layers, entries, details = importance.build(
                importance.at_keep(method.keep, method.rank_multiple), reporter)
        else:
            model, layers, entries, details = None, [], {}, {}
    else:
        pivoted = method.pivoted(prepared.source.family)
        ranks = {t: uniform_rank(*prepared.model.get_submodule(t).weight.shape, method.keep, method.rank_multiple,
                                 pivoted) for t in prepared.targets}
        spectra = spectra_of(prepared.model, [t for t, r in ranks.items() if r is not None], method.name,
                             prepared.stats, reporter)
        layers, entries, _ = apply_ranks(prepared.model, spectra, ranks, pivoted=pivoted)
        model, details = prepared.model.cpu().eval(), {}
    details.update({"wall_s": round(time.perf_counter() - start, 2), "device": str(prepared.device)})
    if prepared.stats is not None:
        details["statistics_bytes"] = prepared.stats.nbytes()
    return Compressed(model, prepared.tokenizer, _record(prepared, method, layers, details, model_ref),
                      entries, prepared.source, importance, prepared.calibration)


def compress_streamed(source: ModelSource, method: Method, calib: CalibrationConfig | str | Sequence[str] = "builtin",
                      exclude: Sequence[str] = (), device: str = "auto", batch_size: int = 16,
                      propagate: str = "compressed", model_ref: str | None = None,
                      reporter: Reporter = SILENT, calib_precision: str = "auto") -> Compressed:
    """compress() for a decoder too large to load whole: one block at a time (edgesvd.streaming)."""
    start = time.perf_counter()
    calib = calibration_config(calib)
    # Blocks are read one at a time, so there is no runnable model to sample from: a decoder's
    # default (`self`) becomes the built-in corpus here, and an explicit `--calib self` is refused.
    if SELF in calib.sources():
        raise ConfigError("--calib self samples from the whole model, which the streamed path never loads: "
                          "give --calib text (or 'builtin'), or --stream off")
    if not calib.sources():
        calib = replace(calib, source=BUILTIN)
    torch_device = local_device(resolve_device(device))
    group = join(torch_device)  # torchrun: this rank's share of the calibration batches
    tokenizer = load_tokenizer(source.path)
    sample = None
    if method.needs_statistics:
        from transformers import AutoConfig

        _check_positions(AutoConfig.from_pretrained(source.path), calib.seq_len)
        sample = sample_calibration(tokenizer, calib, source.family, params=parameter_count(source.path))
    shown = reporter if group.writer else SILENT
    if isinstance(method, Learned):
        result = compress_learned_blocks(source, method, sample, tuple(exclude), torch_device, batch_size, shown, group,
                                         calib_precision)
    else:
        result = compress_blocks(source, method, sample, tuple(exclude), torch_device, batch_size, propagate, shown,
                                 group, calib_precision)
    details = {**result.details, "wall_s": round(time.perf_counter() - start, 2), "device": str(torch_device)}
    record = CompressionRecord(
        method=method.name, keep_requested=method.keep, family=source.family.name,
        source_model=model_ref or source.name, layers=result.layers, rank_multiple=method.rank_multiple,
        calibration=sample.summary if sample is not None else {}, details=details, versions=library_versions())
    return Compressed(result.model, tokenizer, record, result.entries, source, None, calib, writer=group.writer,
                      shards=result.shards)


def compress(model: str | os.PathLike = DEFAULT_MODEL, method: Method | str = DEFAULT_METHOD, *,
             calib: CalibrationConfig | str | Sequence[str] | None = None, include: Sequence[str] = (),
             exclude: Sequence[str] = (), device: str = "auto", batch_size: int = 16,
             trust_remote_code: bool = False, stream: str | bool = "auto", calib_precision: str = "auto",
             reporter: Reporter = SILENT) -> Compressed:
    """Compress `model` (the alias 'minilm', a local folder, a GGUF file or a hub id) with `method`
    (a config such as `Learned(keep=0.5)`, or a method name with its defaults); nothing is written.

    calib: None (the family's default: the built-in corpus for encoders, the decoder's own samples
    for decoders), 'builtin', 'docstrings', 'self', a .txt/.jsonl file or folder, several of them,
    or a CalibrationConfig (sources, sequences, length, seed, sampling temperature). include / exclude: glob patterns on layer names. device: where
    torch runs ('auto' uses CUDA when present). batch_size: sequences per forward pass while
    collecting statistics. stream: 'auto' compresses a decoder larger than
    streaming.STREAM_ABOVE_BYTES one block at a time (edgesvd.streaming), 'on' / 'off' force it.
    calib_precision: of the streamed path's passes over the calibration data that train nothing
    (edgesvd.device.PRECISIONS; 'auto': bfloat16 autocast on CPUs with AMX and on CUDA GPUs); the
    whole-model path (small models) computes in float32, the streamed learned method's fine-tuning at
    `Learned.train_precision`.
    """
    method = method_config(method)
    check_precision(calib_precision)
    source = resolve_model(model)
    if trust_remote_code and stream in ("on", True):
        raise ConfigError("streamed compression builds the model from its config alone and runs no code from the "
                          "model folder: drop --trust-remote-code, or use --stream off")
    if not trust_remote_code and use_streaming(source, method, stream, include, reporter):
        return compress_streamed(source, method, calib, exclude, device, batch_size, model_ref=str(model),
                                 reporter=reporter, calib_precision=calib_precision)
    if calib_precision == "bfloat16":
        raise ConfigError("--calib-precision bfloat16 applies to streamed compression (--stream on, decoders); "
                          "the whole-model path calibrates in float32")
    if isinstance(method, Learned) and method.train_precision == "bfloat16":
        raise ConfigError("--train-precision bfloat16 applies to streamed compression (--stream on, decoders); "
                          "the whole-model path trains in float32")
    if launched():  # every rank would compress the whole model alone and write the same output
        raise ConfigError("several processes (torchrun) share only streamed compression: use --stream on "
                          "on a decoder")
    prepared = prepare(source, calib, include, exclude, device, batch_size, trust_remote_code,
                       need_stats=method.needs_statistics, reporter=reporter, rank_multiple=method.rank_multiple,
                       form=method.form)
    return compress_prepared(prepared, method, str(model), reporter=reporter)
