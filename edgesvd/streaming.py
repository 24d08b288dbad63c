"""Block-streamed compression: a decoder's blocks read from safetensors, calibrated, factorized and released one at a time.

The whole-model path (compression.prepare) loads every weight and holds XᵀX of every layer at
once; here the model is a skeleton with its parameters on the meta device (the same construction
as checkpoint.load_compressed), and one transformer block at a time is materialised from the safetensors
files, run over the calibration activations (collecting its Gram matrices), factorized, and has
its dense weights dropped before the next block is read; the finished block is written to disk as
one part of the checkpoint to be (checkpoint.Shards) and leaves memory too. Peak memory is one
dense block, its statistics and the calibration activations, and at the end the weights outside
the blocks (embeddings, head), independent of depth.

Block i+1 is calibrated on the outputs of the already-compressed block i by default
(`propagate="compressed"`, as GPTQ and SVD-LLM's low-resource mode do): its statistics then
describe what its layers will receive, which measured 9 % lower WikiText-2 perplexity on
SmolLM2-135M at whiten keep 0.8 than dense propagation. `propagate="dense"` gives factors equal
to the whole-model path's (the same Gram bits), which the tests check.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .calibration import CalibrationBatch
from .checkpoint import Shards, parameters_on_meta
from .device import calibration_matmuls, resolve_precision
from .distributed import Group
from .errors import ConfigError, ModelLoadError, first_line
from .factorize import LayerRecord, apply_ranks, low_rank_class
from .loading import ModelSource, find_blocks, select_targets, set_submodule
from .methods import Method
from .planner import check_rank_multiple, uniform_rank
from .reporting import SILENT, Reporter
from .spectra import factorization_cost, spectra_of
from .statistics import ActivationStats, GramHooks, statistics_bytes

# `compress(stream="auto")` streams a decoder whose safetensors weights are larger than this: real
# LLMs (SmolLM2-135M is 0.54 GB in float32) stream, the embedded MiniLM and the toy decoders do not.
STREAM_ABOVE_BYTES = 256 * 2**20
STREAM_CHOICES = ("auto", "on", "off")
PROPAGATIONS = ("compressed", "dense")
STREAMED_METHODS = ("plain", "asvd", "whiten")  # by compress_blocks; 'learned' by streaming_learned


def weights_bytes(folder: Path) -> int:
    """Bytes of a model folder's safetensors files."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def parameter_count(folder: Path) -> int:
    """Parameters stored in a model folder's safetensors files (read from their headers)."""
    from safetensors import safe_open

    total = 0
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


def use_streaming(source: ModelSource, method: Method, stream: str | bool, include=(), reporter: Reporter = SILENT
                  ) -> bool:
    """Whether compress() takes the streamed path: 'on' / 'off' as asked (ConfigError when it cannot
    stream), 'auto' for a decoder method it supports above STREAM_ABOVE_BYTES."""
    stream = {True: "on", False: "off"}.get(stream, stream)
    if stream not in STREAM_CHOICES:
        raise ConfigError(f"unknown stream mode '{stream}' (choose from {', '.join(STREAM_CHOICES)})")
    if stream == "off":
        return False
    why_not = None
    if not source.family.causal:
        why_not = "streamed compression is for decoders (encoders are small enough to load whole)"
    elif include:
        why_not = "--include adds layers outside the transformer blocks, which streaming does not compress"
    if stream == "on":
        if why_not:
            raise ConfigError(why_not)
        return True
    big = weights_bytes(source.path) > STREAM_ABOVE_BYTES
    if big and why_not:
        reporter.info(f"loading the whole model: {why_not}")
    return big and why_not is None


class LazyWeights:
    """Tensor name → safetensors file, read a few tensors at a time. Files are opened per read and
    closed again, so mmapped pages do not stay resident."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        try:
            if index.is_file():
                self.files = json.loads(index.read_text())["weight_map"]
            else:
                with safe_open(str(self.folder / "model.safetensors"), "pt") as f:
                    self.files = {k: "model.safetensors" for k in f.keys()}
        except Exception as exc:
            raise ModelLoadError(f"cannot read the weights of {self.folder}: {first_line(exc)}") from None

    def read(self, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        missing = [n for n in names if n not in self.files]
        if missing:
            raise ModelLoadError(f"{self.folder} lacks the tensor {missing[0]}")
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for file, group in by_file.items():
            with safe_open(str(self.folder / file), "pt", device=str(device)) as f:
                for n in group:
                    # On the CPU a tensor read here lives inside a private mapping of the whole file, and
                    # keeps it (and every page touched through it) resident while it lives: a block's norm
                    # weights kept in the result held each block's pages (+14 MB per SmolLM2 block). A copy
                    # lets the mapping go when the file is closed.
                    t = f.get_tensor(n)
                    out[n] = t.clone() if t.device.type == "cpu" else t
        return out


def skeleton(source: ModelSource) -> nn.Module:
    """The model with its parameters on the meta device and its buffers (rotary frequencies) real."""
    from transformers import AutoConfig
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.from_pretrained(source.path)
    with parameters_on_meta():
        model = source.family.auto_model().from_config(config, dtype=torch.float32)
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(source.path)
    except OSError:  # no generation_config.json: the one derived from config.json stays
        pass
    if any(isinstance(m, Conv1D) for m in model.modules()):
        raise ConfigError(f"{source.name} stores its layers as Conv1D (GPT-2 style), which streaming does not read; "
                          "use stream 'off'")
    return model.eval()


def materialize_parameters(module: nn.Module, prefix: str, weights: LazyWeights, device: torch.device,
                 names: list[str] | None = None) -> None:
    """Give `module`'s parameters (or those of `names`) their values from the files."""
    names = [n for n, _ in module.named_parameters()] if names is None else names
    tensors = weights.read([prefix + n for n in names], device)
    for n in names:
        _set_parameter(module, n, tensors[prefix + n].to(device=device, dtype=torch.float32))


def _set_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    target._parameters[attr] = nn.Parameter(value, requires_grad=False)


def release_parameters(module: nn.Module, names: list[str]) -> None:
    for n in names:
        _set_parameter(module, n, torch.empty_like(module.get_parameter(n), device="meta"))


def release_memory(device: torch.device) -> None:
    """Hand freed memory back: without glibc's malloc_trim, freed blocks fragment the heap and the
    RSS creeps up block after block (measured: +0.3 GB over SmolLM2's 30 blocks)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Inside, Python's garbage collector leaves alone every object that exists on entry (the libraries,
    the skeleton, the calibration data): release_memory's collection after each block then looks only
    at what the block made, 0.2 ms instead of 0.23 s per block on SmolLM2 (400k objects, 30 blocks and,
    for the learned method, three sweeps). What was frozen is unfrozen on exit."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def available_memory(device: torch.device) -> int | None:
    """Bytes this process could still allocate on `device` (free GPU memory, or the kernel's
    MemAvailable); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks_name: str, blocks: nn.ModuleList, weights: LazyWeights,
                   batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
                   ) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """Hidden states entering block 0 per batch, and the arguments the model passes to each block
    (masks, positions, rotary embeddings), found by running the model with every block replaced
    by a recorder. Only the parameters outside the blocks are read; the output head is skipped."""
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    head = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
    head -= {id(p) for p in in_emb.parameters()} if in_emb is not None else set()  # a tied head is the embedding
    outside = [n for n, p in model.named_parameters()
               if not n.startswith(blocks_name + ".") and id(p) not in head and n in weights.files]
    materialize_parameters(model, "", weights, device, outside)
    for name, buf in list(model.named_buffers()):
        if buf.device != device:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, buf.to(device))
    hidden: list[torch.Tensor] = []
    per_block: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]

    def recorder(i: int):
        def forward(h, *args, **kwargs):
            if i == 0:
                hidden.append(h)
            per_block[i].append((args, kwargs))
            if i == len(blocks) - 1:
                raise _Stop
            return h
        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)  # an instance attribute: attributes the model loop reads stay
    try:
        for ids, mask in batches:
            try:
                model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for block in blocks:
            del block.forward
    release_parameters(model, outside)
    return hidden, per_block


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[torch.Tensor], arguments: list[tuple[tuple, dict]],
              masks: list[torch.Tensor] | None = None, targets: list[str] = (), prefix: str = ""
              ) -> tuple[list[torch.Tensor], ActivationStats | None]:
    """The block's outputs per batch; with `masks`, also XᵀX of the inputs of `targets` (layers that
    read the same tensor share one matrix, as in statistics.collect_statistics)."""
    stats = ActivationStats() if masks is not None else None
    hooks = GramHooks(stats, {t: block.get_submodule(t[len(prefix):]) for t in targets}) if stats is not None else None
    outputs = []
    try:
        for b, (h, (args, kwargs)) in enumerate(zip(inputs, arguments)):
            if hooks is not None:
                hooks.batch(masks[b])
            out = block(h, *args, **kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
            if hooks is not None:
                hooks.batch_done()
    finally:
        if hooks is not None:
            hooks.remove()
    return outputs, stats


@dataclass
class Streamed:
    """What the streamed path returns: the compressed model (CPU, eval), the checkpoint's layer
    records and spectrum entries, the details (timings, peak memory) and, where the blocks were
    written as they were finished, those parts (the model's blocks are then on the meta device)."""

    model: nn.Module
    layers: list[LayerRecord]
    entries: dict[str, dict[str, torch.Tensor]]
    details: dict = field(default_factory=dict)
    shards: Shards | None = None


def memory_estimate(model: nn.Module, blocks: nn.ModuleList, targets: list[str], keep: float, tokens: int,
                    batch_tokens: int, factors_kept: bool = True) -> dict[str, int]:
    """Bytes the streamed path holds at its peak (the end of the last block), from the skeleton's shapes:
    one dense block, its Gram matrices (float64; an upper bound: layers sharing an input are
    counted apart), the calibration stream in and out (float32), one batch's widest activation,
    the factors (keep × the blocks' weights: of every block when they are `factors_kept` in memory,
    else of one) and the weights outside the blocks."""
    numel = lambda params: sum(p.numel() for p in params)  # noqa: E731
    widest = max(max(p.shape) for p in blocks[0].parameters())
    hidden = getattr(model.config, "hidden_size", None) or widest
    in_block = {id(p) for p in blocks.parameters()}
    parts = {
        "dense_block": 4 * numel(blocks[0].parameters()),
        "statistics": sum(statistics_bytes(model.get_submodule(t)) for t in targets
                          if t.startswith(_prefix_of(model, blocks, 0))),
        "activations": 4 * tokens * hidden * 2 + 4 * batch_tokens * widest * 4,
        "factors": int(4 * keep * numel(blocks.parameters() if factors_kept else blocks[0].parameters())),
        "outside_blocks": 4 * numel(p for p in {id(p): p for p in model.parameters()}.values()
                                    if id(p) not in in_block),
    }
    parts["total"] = sum(parts.values())
    return parts


def _prefix_of(model: nn.Module, blocks: nn.ModuleList, i: int) -> str:
    name = next(n for n, m in model.named_modules() if m is blocks)
    return f"{name}.{i}."


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass
class Stream:
    """A streamed model ready for its blocks: the lazy weights, the skeleton, its blocks, the target
    layers inside them, and (with calibration data) the hidden states entering block 0 per batch,
    each block's own arguments, the token masks and the batches themselves."""

    weights: LazyWeights
    model: nn.Module
    blocks_name: str
    blocks: nn.ModuleList
    targets: list[str]
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    hidden: list[torch.Tensor] | None
    arguments: list[list[tuple[tuple, dict]]] | None
    masks: list[torch.Tensor] | None

    def prefix(self, i: int) -> str:
        return f"{self.blocks_name}.{i}."

    def targets_of(self, i: int) -> list[str]:
        """The targets inside block i (full names)."""
        return [n for n in self.targets if n.startswith(self.prefix(i))]

    @property
    def tokens(self) -> int:
        return sum(ids.numel() for ids, _ in self.batches)

    @property
    def widest_batch(self) -> int:
        return max((ids.numel() for ids, _ in self.batches), default=0)

    def materialize(self, i: int, device: torch.device) -> nn.Module:
        """Block i with its dense weights read from the files."""
        materialize_parameters(self.blocks[i], self.prefix(i), self.weights, device)
        return self.blocks[i]

    def finish(self, shards: Shards | None = None) -> nn.Module:
        """The model once every block is done: the weights outside the blocks read, eval mode (the
        blocks already written to `shards` stay on the meta device)."""
        _finish_outside_blocks(self.model, self.weights, shards.weight_map if shards else {})
        return self.model.eval()

    def spill(self, i: int, shards: Shards) -> None:
        """Write finished block i to `shards` and drop its parameters from memory."""
        block = self.blocks[i]
        shards.write({self.prefix(i) + n: t for n, t in block.state_dict().items()})
        release_parameters(block, [n for n, _ in block.named_parameters()])


def open_stream(source: ModelSource, method: Method, calib: CalibrationBatch | None, exclude: tuple[str, ...],
                device: torch.device, batch_size: int, group: Group) -> Stream:
    """Read the skeleton and find its blocks and targets; with calibration data, this rank's share of
    the batches and the inputs of block 0 (only the weights outside the blocks are read for that)."""
    if method.needs_statistics and calib is None:
        raise ConfigError(f"method '{method.name}' needs calibration data")
    weights = LazyWeights(source.path)
    model = skeleton(source)
    blocks_name, blocks = find_blocks(model)
    targets = [n for n in select_targets(model, (), exclude) if n.startswith(blocks_name + ".")]
    check_rank_multiple({n: tuple(model.get_submodule(n).weight.shape) for n in targets}, method.rank_multiple,
                        method.pivoted(source.family))
    hidden = per_block = masks = None
    batches: list = []
    if method.needs_statistics:
        batches = group.shard(list(calib.batches(batch_size)))
        hidden, per_block = capture_inputs(model, blocks_name, blocks, weights, batches, device)
        masks = [m.reshape(-1).bool().to(device) for _, m in batches]
    return Stream(weights, model, blocks_name, blocks, targets, batches, hidden, per_block, masks)


class Laps:
    """Wall time per phase, CPU time and the RSS after each block: the streamed paths' receipt."""

    def __init__(self) -> None:
        self.start_wall, self.start_cpu = time.perf_counter(), time.process_time()
        self.timings: dict[str, float] = {}
        self.rss_after_block: list[int] = []
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the last lap to `phase`."""
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self._t
        self._t = now

    def block_done(self, device: torch.device) -> None:
        release_memory(device)
        self.rss_after_block.append(_current_rss_bytes())

    def details(self) -> dict:
        return {
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
            "cpu_s": round(time.process_time() - self.start_cpu, 2),
            "stream_wall_s": round(time.perf_counter() - self.start_wall, 2),
            "peak_rss_bytes": _peak_rss_bytes(), "rss_after_block_bytes": self.rss_after_block,
        }


def compress_blocks(source: ModelSource, method: Method, calib: CalibrationBatch | None,
                    exclude: tuple[str, ...] = (), device: torch.device = torch.device("cpu"),
                    batch_size: int = 16, propagate: str = "compressed", reporter: Reporter = SILENT,
                    group: Group = Group(), precision: str = "auto") -> Streamed:
    """Compress `source` block by block with `method` (plain, asvd or whiten; uniform ranks at
    `method.keep`). `calib` is the calibration sample (None for plain, which needs no data).
    The layers compressed are every Linear inside a block, less `exclude` patterns. `group`: the
    ranks sharing the calibration batches (edgesvd.distributed); every rank gets the same factors.
    `precision`: of the calibration passes' matmuls (edgesvd.device.PRECISIONS; the factorization
    itself is always float32/float64). The learned method streams through edgesvd.streaming_learned."""
    if method.name not in STREAMED_METHODS:
        raise ConfigError(f"method '{method.name}' is not streamed by compress_blocks (see streaming_learned)")
    if propagate not in PROPAGATIONS:
        raise ConfigError(f"unknown propagation '{propagate}' (choose from {', '.join(PROPAGATIONS)})")
    needs_data = method.needs_statistics
    pivoted = method.pivoted(source.family)
    precision = resolve_precision(precision, device)
    laps = Laps()
    stream = open_stream(source, method, calib, exclude, device, batch_size, group)
    model, blocks, hidden = stream.model, stream.blocks, stream.hidden
    laps.lap("load_s")

    layers: list[LayerRecord] = []
    entries: dict[str, dict[str, torch.Tensor]] = {}
    # Each finished block goes to disk (a part of the checkpoint to be), so memory stays flat in depth.
    shards = Shards(len(blocks) + 1)
    factorized_by = [0] * group.size
    estimate = memory_estimate(model, blocks, stream.targets, method.keep, stream.tokens, stream.widest_batch,
                               factors_kept=False)
    reporter.step(f"streamed {method.name}: {len(blocks)} blocks of {source.name}, one at a time "
                  f"(tensors at the peak ≈ {estimate['total'] / 2**30:.2f} GiB)")
    with reporter.progress(f"blocks ({method.name})", total=len(blocks)) as bar, frozen_heap():
        for i in range(len(blocks)):
            mine = stream.targets_of(i)
            block = stream.materialize(i, device)
            laps.lap("load_s")
            stats = None
            if needs_data:
                with calibration_matmuls(precision, device):
                    outputs, stats = run_block(block, hidden, stream.arguments[i], stream.masks, mine,
                                               stream.prefix(i))
                group.sum_statistics(stats)
                laps.lap("statistics_s")
            ranks = {n: uniform_rank(*model.get_submodule(n).weight.shape, method.keep, method.rank_multiple,
                                     pivoted) for n in mine}
            # Under torchrun each rank factorizes its share of the block's layers and broadcasts the factors.
            owner = group.owners({n: factorization_cost(*model.get_submodule(n).weight.shape)
                                  for n, r in ranks.items() if r is not None})
            spectra = spectra_of(model, [n for n in owner if owner[n] == group.rank], method.name, stats)
            block_layers, block_entries, _ = apply_ranks(model, spectra, ranks, pivoted=pivoted)
            _share_factors(model, group, owner, ranks, block_entries, pivoted)
            for n in owner:
                factorized_by[owner[n]] += 1
            layers += block_layers
            entries.update({n: {k: v.cpu() for k, v in e.items()} for n, e in block_entries.items()})
            del spectra, stats
            laps.lap("factorize_s")
            if needs_data:
                if propagate == "compressed":
                    del outputs
                    with calibration_matmuls(precision, device):
                        outputs, _ = run_block(block, hidden, stream.arguments[i])
                hidden = outputs
                laps.lap("propagate_s")
            stream.spill(i, shards)
            laps.lap("write_s")
            laps.block_done(device)
            bar.advance()
    del hidden
    stream.hidden = stream.arguments = None
    model = stream.finish(shards)
    laps.lap("load_s")
    release_memory(device)
    details = {"streamed": True, "propagate": propagate if needs_data else None, "blocks": len(blocks),
               "calibration_precision": precision if needs_data else None,
               "ranks": group.size, "factorized_by_rank": factorized_by, **laps.details(),
               "memory_estimate_bytes": estimate}
    return Streamed(model, layers, entries, details, shards)


def _share_factors(model: nn.Module, group: Group, owner: dict[str, int], ranks: dict[str, int | None],
                   entries: dict[str, dict[str, torch.Tensor]], pivoted: bool = False) -> None:
    """Every rank gets the factors and spectrum entries of the layers other ranks computed: such a layer
    becomes a LowRankLinear of its rank here, which its owner's broadcast fills."""
    if group.size == 1:
        return
    tensors = {}
    for name in owner:
        if owner[name] != group.rank:
            dense = model.get_submodule(name)
            weight = dense.weight
            set_submodule(model, name, low_rank_class(pivoted)(weight.shape[1], weight.shape[0], ranks[name],
                                                               bias=dense.bias is not None, device=weight.device,
                                                               dtype=weight.dtype))
            if dense.bias is not None:
                model.get_submodule(name).out_bias.data.copy_(dense.bias.detach())
            full = min(weight.shape)
            entries[name] = {k: torch.empty(full, dtype=torch.float64, device=weight.device) for k in ("sigma", "kept")}
        layer = model.get_submodule(name)
        form = [layer.rows, layer.scale] if pivoted else []
        tensors[name] = [layer.a.weight.data, layer.b.weight.data, *form, entries[name]["sigma"], entries[name]["kept"]]
    group.broadcast_owned(owner, tensors)


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _finish_outside_blocks(model: nn.Module, weights: LazyWeights, written: dict[str, str]) -> None:
    """Read every parameter outside the blocks (embeddings, final norm, head) on the CPU and tie the
    head to the embedding where the config says so (a tied checkpoint stores it once); those
    `written` already stay where they are."""
    names = [n for n, p in model.named_parameters()
             if p.device.type == "meta" and n in weights.files and n not in written]
    materialize_parameters(model, "", weights, torch.device("cpu"), names)
    model.tie_weights()
    for name, buf in list(model.named_buffers()):
        if buf.device.type != "cpu":
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, buf.cpu())
    still = [n for n, p in model.named_parameters() if p.device.type == "meta" and n not in written]
    if still:
        raise ModelLoadError(f"the weights of {weights.folder} lack {still[:3]}")
