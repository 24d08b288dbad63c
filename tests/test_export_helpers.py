"""Shared, cached builders for the exporters' tests: compressed checkpoints and their ONNX exports.

Imported by test_export*.py, test_parity.py, test_profile.py, test_pack.py and test_run.py so each
checkpoint/export is built once per session (the cache is keyed by its folder).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

FAMILIES = ["tiny_llama_dir", "tiny_gpt2_dir", "tiny_qwen2_dir", "tiny_bert_dir"]


@lru_cache(maxsize=None)
def checkpoint(model_dir: Path, root: Path, keep: float = 0.5, method: str = "whiten", form: str | None = None) -> Path:
    """A compressed checkpoint of `model_dir` (whiten, few calibration sequences, the family's form
    unless `form`) under `root`."""
    from edgesvd import CalibrationConfig, compress
    from edgesvd.methods import method_config

    out = root / f"ck-{Path(model_dir).name}-{method}-{keep}{'-' + form if form else ''}"
    if not out.exists():
        compress(str(model_dir), method_config(method, keep=keep, rank_multiple=8, form=form),
                 calib=CalibrationConfig(num_sequences=8, seq_len=32), device="cpu").save(out)
    return out


@lru_cache(maxsize=None)
def exported(ck: Path, root: Path, dtype: str = "fp32", quantize: str | None = None, pooled: bool = False) -> Path:
    """The ONNX export of a checkpoint under `root` (cached)."""
    from edgesvd.exporters.export import ExportConfig, export_checkpoint

    out = root / f"onnx-{ck.name}-{dtype}-{quantize}-{pooled}"
    if not out.exists():
        export_checkpoint(ck, out, ExportConfig(dtype=dtype, quantize=quantize, pooled=pooled))
    return out


@lru_cache(maxsize=None)
def exported_dense(model_dir: Path, root: Path) -> Path:
    from edgesvd.exporters.export import ExportConfig, export_dense

    out = root / f"onnx-dense-{Path(model_dir).name}"
    if not out.exists():
        export_dense(str(model_dir), out, ExportConfig())
    return out


def work_root(tmp_path_factory) -> Path:
    """One folder per test session shared by all the exporters' test modules."""
    root = tmp_path_factory.getbasetemp() / "exporters"
    root.mkdir(exist_ok=True)
    return root


def run_cfg(model_dir, out_root, runs: int = 5, warmup: int = 1, **kw):
    """A small `edgesvd run` configuration (8 calibration sequences of 32 tokens)."""
    from edgesvd import CalibrationConfig
    from edgesvd.exporters.deploy import DeployConfig, RunConfig

    deploy = DeployConfig(runs=runs, warmup=warmup, **{k: kw.pop(k) for k in ("eval_file", "seq_len") if k in kw})
    return RunConfig(model=str(model_dir), calibration=CalibrationConfig(num_sequences=8, seq_len=32),
                     out_root=out_root, deploy=deploy, **kw)


def run_profiles(cfg, profiles, max_plans: int = 3):
    """`edgesvd run --profile …` on `cfg` for Profile objects; the per-device results."""
    from dataclasses import replace

    from edgesvd.exporters.deploy import run

    cfg = replace(cfg, profiles=tuple(profiles), deploy=replace(cfg.deploy, max_plans=max_plans))
    return run(cfg).devices
