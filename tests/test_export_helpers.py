"""Shared, cached builders for the exporters' tests: compressed checkpoints and their ONNX exports.

Imported by test_export*.py, test_parity.py, test_profile.py, test_pack.py and test_run.py so each
checkpoint/export is built once per session (the cache is keyed by its folder).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

FAMILIES = ["tiny_llama_dir", "tiny_gpt2_dir", "tiny_qwen2_dir", "tiny_bert_dir"]


@lru_cache(maxsize=None)
def checkpoint(model_dir: Path, root: Path, keep: float = 0.5, method: str = "whiten") -> Path:
    """A compressed checkpoint of `model_dir` (whiten, few calibration sequences) under `root`."""
    from edgesvd.calibration import CalibrationConfig
    from edgesvd.checkpoint import save_compressed
    from edgesvd.compress import CompressConfig, compress

    out = root / f"ck-{Path(model_dir).name}-{method}-{keep}"
    if not out.exists():
        cfg = CompressConfig(model=str(model_dir), method=method, keep=keep, rank_multiple=8,
                             calibration=CalibrationConfig(num_sequences=8, seq_len=32), device="cpu",
                             show_progress=False)
        r = compress(cfg)
        save_compressed(r.model, r.tokenizer, r.record, out, r.spectra)
    return out


@lru_cache(maxsize=None)
def exported(ck: Path, root: Path, dtype: str = "fp32", quantize: str | None = None, pooled: bool = False) -> Path:
    """The ONNX export of a checkpoint under `root` (cached)."""
    from exporters.onnx_export import ExportConfig, export_checkpoint

    out = root / f"onnx-{ck.name}-{dtype}-{quantize}-{pooled}"
    if not out.exists():
        export_checkpoint(ck, out, ExportConfig(dtype=dtype, quantize=quantize, pooled=pooled))
    return out


@lru_cache(maxsize=None)
def exported_dense(model_dir: Path, root: Path) -> Path:
    from exporters.onnx_export import ExportConfig, export_dense

    out = root / f"onnx-dense-{Path(model_dir).name}"
    if not out.exists():
        export_dense(str(model_dir), out, ExportConfig())
    return out


def work_root(tmp_path_factory) -> Path:
    """One folder per test session shared by all the exporters' test modules."""
    root = tmp_path_factory.getbasetemp() / "exporters"
    root.mkdir(exist_ok=True)
    return root
