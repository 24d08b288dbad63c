"""Checkpoints: save and rebuild compressed models (safetensors factors + config with an `edgesvd` section)."""

from __future__ import annotations

import json
import os
import platform
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from .errors import CheckpointError, first_line
from .factorize import LayerRecord, LowRankLinear, keep_of
from .families import family_named
from .loading import linearize_conv1d, set_submodule
from .outputs import atomic_output_dir

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
SPECTRUM = "spectrum.safetensors"


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


def save_compressed(model: nn.Module, tokenizer, record: CompressionRecord, out: str | os.PathLike,
                    spectra: dict[str, dict[str, torch.Tensor]] | None = None, force: bool = False) -> Path:
    """Write config.json (+ `edgesvd` section), model.safetensors, tokenizer files and, when
    given, spectrum.safetensors (per layer: singular values, scores, kept mask) atomically."""
    out = Path(out)
    record.versions = record.versions or library_versions()
    with atomic_output_dir(out, force) as tmp:
        config = model.config.to_dict()
        config["edgesvd"] = record.to_json()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None and family_named(record.family).causal:
            gen.save_pretrained(tmp)
        # save_model de-duplicates tied tensors (embedding / LM head), which save_file refuses.
        save_model(model, str(tmp / WEIGHTS))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if spectra:
            flat = {f"{layer}.{key}": t.detach().float().cpu().contiguous()
                    for layer, entries in spectra.items() for key, t in entries.items()}
            save_file(flat, str(tmp / SPECTRUM))
    return out


def read_record(path: str | os.PathLike) -> tuple[dict, CompressionRecord]:
    """The raw config dict and the parsed `edgesvd` section of a checkpoint folder."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint is not a folder: {path}")
    if not cfg_file.is_file():
        raise CheckpointError(f"no config.json in checkpoint {path}")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"unreadable config.json in {path}: {exc}") from exc
    if "edgesvd" not in config:
        raise CheckpointError(f"{path} is not an edgesvd checkpoint (config.json has no 'edgesvd' section)")
    try:
        record = CompressionRecord.from_json(config["edgesvd"])
    except (TypeError, KeyError) as exc:
        raise CheckpointError(f"malformed 'edgesvd' section in {cfg_file}: {exc}") from exc
    if record.format_version > FORMAT_VERSION:
        raise CheckpointError(f"{path} uses checkpoint format {record.format_version}; this edgesvd reads up to {FORMAT_VERSION}")
    return config, record


@contextmanager
def _parameters_on_meta():
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
    for key, t in load_file(str(f)).items():
        layer, _, entry = key.rpartition(".")
        out.setdefault(layer, {})[entry] = t
    return out


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
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"no {WEIGHTS} in checkpoint {path}")
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as exc:
        raise CheckpointError(f"corrupt {weights}: {first_line(exc)}") from exc
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with _parameters_on_meta():
        model = family_named(record.family).auto_model().from_config(config, trust_remote_code=trust_remote_code,
                                                                     dtype=torch.float32)
    linearize_conv1d(model)
    for layer in record.layers:
        if layer.rank is not None:
            set_submodule(model, layer.name, LowRankLinear(layer.in_features, layer.out_features,
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
