"""Checkpoints: save and rebuild compressed models (safetensors factors + config with an `edgesvd` section)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from .errors import CheckpointError, OutputError, first_line
from .factorize import LayerRecord, break_even_rank, dense_or_rank, keep_of, low_rank_class
from .families import FAMILIES, family_named
from .inputs import read_json, validate
from .loading import linearize_conv1d, set_submodule
from .outputs import atomic_output_dir

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # sharded weights, as Hugging Face writes them
SPECTRUM = "spectrum.safetensors"
SPECTRUM_ENTRIES = ("sigma", "kept", "scores")  # per layer, each over the layer's whole spectrum

_LAYER = {
    "type": "object", "additionalProperties": False,
    "required": ["name", "in_features", "out_features", "rank", "bias"],
    "properties": {"name": {"type": "string", "minLength": 1}, "in_features": {"type": "integer", "minimum": 1},
                   "out_features": {"type": "integer", "minimum": 1},
                   "rank": {"type": ["integer", "null"], "minimum": 1},
                   "bias": {"type": "boolean"}, "pivoted": {"type": "boolean"}},
}
# The `edgesvd` section of a checkpoint's config.json, format 1 (CompressionRecord.to_json).
SECTION_SCHEMA: dict = {
    "type": "object", "additionalProperties": False,
    "required": ["method", "keep_requested", "family", "source_model", "layers", "format_version"],
    "properties": {
        "format_version": {"const": FORMAT_VERSION},
        "method": {"type": "string", "minLength": 1},
        "keep_requested": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "keep_actual": {"type": "number"},
        "family": {"enum": sorted(FAMILIES)},
        "source_model": {"type": "string"},
        "layers": {"type": "array", "minItems": 1, "items": _LAYER},
        "rank_multiple": {"type": "integer", "minimum": 1},
        "calibration": {"type": "object"}, "details": {"type": "object"}, "versions": {"type": "object"},
    },
}


@dataclass
class CompressionRecord:
    """Everything the `edgesvd` section of config.json says about how a model was compressed."""

    method: str
    keep_requested: float
    family: str
    source_model: str
    layers: list[LayerRecord]
    rank_multiple: int = 8
    calibration: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # method-specific: stages, losses, timings
    versions: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def keep_actual(self) -> float:
        return keep_of(self.layers)

    def ranks(self) -> dict[str, int | None]:
        return {l.name: l.rank for l in self.layers}

    def to_json(self) -> dict:
        d = asdict(self)
        d["keep_actual"] = self.keep_actual
        return d

    @classmethod
    def from_json(cls, d: dict) -> "CompressionRecord":
        d = dict(d)
        d.pop("keep_actual", None)
        d["layers"] = [LayerRecord(**l) for l in d["layers"]]
        return cls(**d)


def library_versions() -> dict:
    """Versions of the libraries a checkpoint depends on (from package metadata)."""
    return {"edgesvd": version("edgesvd"), "torch": torch.__version__, "transformers": version("transformers"),
            "safetensors": version("safetensors"), "python": platform.python_version()}


class Shards:
    """A checkpoint's weights written part by part before its folder exists, so that a streamed
    compression keeps no finished block in memory: one safetensors file per part, named as Hugging
    Face names shards, and an index kept current, in a temporary folder (removed with this object)
    that save_compressed links into the checkpoint."""

    def __init__(self, parts: int) -> None:
        self.parts = parts
        self._dir = tempfile.TemporaryDirectory(prefix="edgesvd-shards-")
        self.folder = Path(self._dir.name)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0  # bytes of tensor data written

    @property
    def written(self) -> int:
        return len(set(self.weight_map.values()))

    def next_name(self) -> str:
        return f"model-{self.written + 1:05d}-of-{self.parts:05d}.safetensors"

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """The next part (tensors moved to the CPU)."""
        name = self.next_name()
        flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        _saved(save_file, flat, self.folder / name, self.folder)
        self.weight_map.update(dict.fromkeys(flat, name))
        self.total_size += _nbytes(flat)

    def write_index(self, folder: Path, extra: dict[str, str] | None = None, extra_size: int = 0) -> None:
        """model.safetensors.index.json in `folder`: the parts written (plus `extra` names in another file)."""
        index = {"metadata": {"total_size": self.total_size + extra_size},
                 "weight_map": dict(sorted({**self.weight_map, **(extra or {})}.items()))}
        (folder / INDEX).write_text(json.dumps(index, indent=1) + "\n")

    def link_into(self, folder: Path) -> None:
        """Every part written so far, hard-linked into `folder` (copied across file systems)."""
        for name in sorted(set(self.weight_map.values())):
            try:
                os.link(self.folder / name, folder / name)
            except OSError:
                shutil.copyfile(self.folder / name, folder / name)


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _distinct(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One name per tensor: a tied embedding and LM head share one storage, which safetensors stores once."""
    seen: set[tuple] = set()
    out = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def save_compressed(model: nn.Module, tokenizer, record: CompressionRecord, out: str | os.PathLike,
                    spectra: dict[str, dict[str, torch.Tensor]] | None = None, force: bool = False,
                    shards: Shards | None = None) -> Path:
    """Write config.json (+ `edgesvd` section), model.safetensors, tokenizer files and, when
    given, spectrum.safetensors (per layer: singular values, scores, kept mask) atomically.
    With `shards` (parts already written, e.g. a streamed compression's blocks), the weights are
    those parts plus one last part holding the rest of the model, and model.safetensors.index.json."""
    out = Path(out)
    record.versions = record.versions or library_versions()
    with atomic_output_dir(out, force, inputs=(record.source_model,)) as tmp:
        config = model.config.to_dict()
        config["edgesvd"] = record.to_json()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None and family_named(record.family).causal:
            gen.save_pretrained(tmp)
        if shards is None:
            # save_model de-duplicates tied tensors (embedding / LM head), which save_file refuses.
            _saved(save_model, model, tmp / WEIGHTS, out)
        else:
            state = model.state_dict()
            rest = {n: t for n, t in state.items() if n not in shards.weight_map}
            unwritten = [n for n, t in rest.items() if t.device.type == "meta"]
            if unwritten:
                raise CheckpointError(f"{out} not written: the weights of {unwritten[0]} are neither in memory "
                                      f"nor among the parts written")
            shards.link_into(tmp)
            last = shards.next_name()
            rest = {n: t.contiguous() for n, t in _distinct(rest).items()}
            _saved(save_file, rest, tmp / last, out)
            shards.write_index(tmp, dict.fromkeys(rest, last), _nbytes(rest))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if spectra:
            flat = {f"{layer}.{key}": t.detach().float().cpu().contiguous()
                    for layer, entries in spectra.items() for key, t in entries.items()}
            _saved(save_file, flat, tmp / SPECTRUM, out)
    return out


def _saved(save, tensors, path: Path, out: Path) -> None:
    """Write a safetensors file; its writer (Rust) raises SafetensorError, not OSError, when the disk
    is full or a file-size limit is hit: that is one OutputError line too."""
    try:
        save(tensors, str(path))
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise OutputError(f"{out} not written: {path.name}: {first_line(exc)}") from None


def check_section(section, where: str, error: type = CheckpointError) -> CompressionRecord:
    """The `edgesvd` section validated (schema, then what a schema cannot say: one entry per layer,
    each rank one that factorization can give) and parsed."""
    if isinstance(section, dict) and isinstance(section.get("format_version"), int) \
            and section["format_version"] > FORMAT_VERSION:
        raise error(f"{where} uses checkpoint format {section['format_version']}; this edgesvd reads up to "
                    f"{FORMAT_VERSION}")
    validate(section, SECTION_SCHEMA, where, error)
    names = [layer["name"] for layer in section["layers"]]
    if len(set(names)) != len(names):
        raise error(f"{where}: layer {next(n for n in names if names.count(n) > 1)} is listed twice")
    for layer in section["layers"]:
        rank, out_f, in_f = layer["rank"], layer["out_features"], layer["in_features"]
        pivoted = layer.get("pivoted", False)
        if rank is not None and dense_or_rank(out_f, in_f, rank, pivoted) is None:
            raise error(f"{where}: layer {layer['name']} has rank {rank}, not below its break-even rank "
                        f"{break_even_rank(out_f, in_f, pivoted):.1f} ({out_f}×{in_f}"
                        f"{', pivoted' if pivoted else ''}): no factorization keeps it")
    return CompressionRecord.from_json(section)


def _factor_shapes(layer: LayerRecord) -> dict[str, tuple[int, ...]]:
    """The tensors a layer has in model.safetensors and their shapes (LowRankLinear: a, b;
    PivotedLowRank: a, b, rows, scale, bias)."""
    n, r, out_f = layer.name, layer.rank, layer.out_features
    if r is None:
        return {f"{n}.weight": (out_f, layer.in_features)}
    if layer.pivoted:
        shapes = {f"{n}.a.weight": (r, layer.in_features), f"{n}.b.weight": (out_f - r, r), f"{n}.rows": (out_f,),
                  f"{n}.scale": (r,)}
        if layer.bias:
            shapes[f"{n}.bias"] = (out_f,)
        return shapes
    shapes = {f"{n}.a.weight": (r, layer.in_features), f"{n}.b.weight": (out_f, r)}
    if layer.bias:
        shapes[f"{n}.b.bias"] = (out_f,)
    return shapes


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes from a safetensors header (no tensor is read); CheckpointError when corrupt."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # SafetensorError (Rust), OSError
        raise CheckpointError(f"corrupt {path}: {first_line(exc)}") from None


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The files holding a checkpoint's weights: model.safetensors, or the parts its index names."""
    path = Path(path)
    if (path / INDEX).is_file():
        schema = {"type": "object", "required": ["weight_map"],
                  "properties": {"weight_map": {"type": "object", "minProperties": 1,
                                                "additionalProperties": {"type": "string",
                                                                         "pattern": r"^[^/\\]+\.safetensors$"}}}}
        index = read_json(path / INDEX, "checkpoint weights index", schema, error=CheckpointError)
        files = [path / name for name in sorted(set(index["weight_map"].values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path / INDEX} names {missing[0]}, which is not in the checkpoint")
        return files
    if not (path / WEIGHTS).is_file():
        raise CheckpointError(f"no {WEIGHTS} (nor {INDEX}) in checkpoint {path}")
    return [path / WEIGHTS]


def _check_weights(path: Path, record: CompressionRecord, tied_output: bool) -> None:
    """Every layer of the section against the stored weights: factor shapes of its rank (or its dense
    weight), and no factors of a layer the section does not list."""
    files = weight_files(path)
    weights = files[0] if len(files) == 1 else path / INDEX
    stored = {name: shape for f in files for name, shape in _tensor_shapes(f).items()}
    for layer in record.layers:
        for name, shape in _factor_shapes(layer).items():
            if name not in stored:
                if layer.rank is None and tied_output:  # a dense, tied output embedding is saved once
                    continue
                raise CheckpointError(f"{weights} has no tensor {name} for layer {layer.name} of the edgesvd "
                                      f"section (rank {layer.rank}): the section does not describe these weights")
            if stored[name] != shape:
                raise CheckpointError(f"{weights}: {name} has shape {list(stored[name])}, but the edgesvd section "
                                      f"says layer {layer.name} is {layer.out_features}×{layer.in_features} at rank "
                                      f"{layer.rank} (shape {list(shape)})")
    listed = {layer.name for layer in record.layers}
    extra = sorted({k.rsplit(".", 2)[0] for k in stored if k.endswith((".a.weight", ".b.weight"))} - listed)
    if extra:
        raise CheckpointError(f"{weights} holds the factors of {extra[0]}, which the edgesvd section does not list")


def check_spectrum_shapes(shapes: dict[str, tuple[int, ...]], record: CompressionRecord, where: str,
                          error: type = CheckpointError) -> None:
    """spectrum.safetensors (by tensor shapes): entries of listed layers only, 1-D, each as long as the
    layer's spectrum (min(out, in))."""
    layers = {layer.name: layer for layer in record.layers}
    for key, shape in shapes.items():
        name, _, entry = key.rpartition(".")
        if name not in layers or entry not in SPECTRUM_ENTRIES:
            raise error(f"{where}: unexpected entry {key} (no such layer or entry in the edgesvd section)")
        full = min(layers[name].out_features, layers[name].in_features)
        if shape != (full,):
            raise error(f"{where}: {key} has shape {list(shape)}, expected [{full}] for layer {name}")


def read_record(path: str | os.PathLike, weights: bool = True) -> tuple[dict, CompressionRecord]:
    """Open a checkpoint folder: the raw config dict and its `edgesvd` section, validated once here —
    against SECTION_SCHEMA, and (with `weights`) against the tensor shapes stored in
    model.safetensors and spectrum.safetensors (headers only, nothing is loaded)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint is not a folder: {path}")
    if not cfg_file.is_file():
        raise CheckpointError(f"no config.json in checkpoint {path}")
    config = read_json(cfg_file, "checkpoint config", {"type": "object"}, error=CheckpointError)
    if "edgesvd" not in config:
        raise CheckpointError(f"{path} is not an edgesvd checkpoint (config.json has no 'edgesvd' section)")
    record = check_section(config["edgesvd"], f"'edgesvd' section of {cfg_file}")
    if weights:
        _check_weights(path, record, bool(config.get("tie_word_embeddings")))
        if (path / SPECTRUM).is_file():
            check_spectrum_shapes(_tensor_shapes(path / SPECTRUM), record, str(path / SPECTRUM))
    return config, record


@contextmanager
def parameters_on_meta():
    """Create parameters on the meta device (no memory) while buffers stay real.

    Buffers such as rotary frequencies are computed at construction and not saved, so they
    must be materialised; parameters all come from the checkpoint.
    """
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_spectra(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Per-layer spectrum entries saved beside the weights ({} if the file is absent)."""
    f = Path(path) / SPECTRUM
    if not f.is_file():
        return {}
    out: dict[str, dict[str, torch.Tensor]] = {}
    try:
        tensors = load_file(str(f))
    except Exception as exc:  # SafetensorError: truncated or not a safetensors file
        raise CheckpointError(f"corrupt {f}: {first_line(exc)}") from None
    for key, t in tensors.items():
        layer, _, entry = key.rpartition(".")
        out.setdefault(layer, {})[entry] = t
    return out


def read_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint stores (from model.safetensors or all its parts), by name."""
    state: dict[str, torch.Tensor] = {}
    for weights in weight_files(path):
        try:
            state.update(load_file(str(weights), device=str(device)))
        except Exception as exc:  # SafetensorError: truncated or not a safetensors file
            raise CheckpointError(f"corrupt {weights}: {first_line(exc)}") from exc
    return state


def load_compressed(path: str | os.PathLike, device: str | torch.device = "cpu",
                    trust_remote_code: bool = False) -> tuple[nn.Module, CompressionRecord]:
    """Rebuild the compressed architecture from config.json and load the saved factors.

    The dense weights of compressed layers are never allocated: the model is built with
    parameters on the meta device, targets are swapped for LowRankLinear, then the saved
    tensors are assigned.
    """
    from transformers import AutoConfig

    path = Path(path)
    raw, record = read_record(path)
    state = read_weights(path, device)
    weights = path / (INDEX if (path / INDEX).is_file() else WEIGHTS)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with parameters_on_meta():
        model = family_named(record.family).auto_model().from_config(config, trust_remote_code=trust_remote_code,
                                                                     dtype=torch.float32)
    linearize_conv1d(model)
    for layer in record.layers:
        if layer.rank is not None:
            set_submodule(model, layer.name, low_rank_class(layer.pivoted)(layer.in_features, layer.out_features,
                                                                           layer.rank, bias=layer.bias, device="meta"))
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # size mismatches between config ranks and saved tensors
        first = next((l.strip() for l in str(exc).splitlines() if "size mismatch" in l), first_line(exc))
        raise CheckpointError(f"{weights} does not match its config: {first}") from exc
    if result.unexpected_keys:
        raise CheckpointError(f"{weights} holds tensors the architecture lacks: {result.unexpected_keys[:3]}")
    # save_model keeps one name of a tied pair (often lm_head.weight); tie_weights copies the input
    # embedding onto the output one, so give the input embedding the saved tensor first.
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    if outp is not None and inp is not None and inp.weight.device.type == "meta" \
            and outp.weight.device.type != "meta" and getattr(config, "tie_word_embeddings", False):
        inp.weight = outp.weight
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"{weights} is missing tensors: {still_meta[:3]}")
    model.to(device)
    return model.eval(), record
