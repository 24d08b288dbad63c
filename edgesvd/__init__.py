"""edgesvd: learned low-rank compression of transformer models for edge devices, delivered as ONNX.

The Python API is two verbs and a config::

    import edgesvd
    ck = edgesvd.compress("minilm", edgesvd.Learned(keep=0.5), calib="texts.txt")
    deployment = edgesvd.deploy(ck, profiles=["raspberry-pi-5", "jetson-orin-nano"], out="out/")

The pipeline, one module per stage: loading → calibration → statistics → spectra → importance →
planner (profiles, costmodel) → factorize → finetune → compression → checkpoint | exporters: export →
graphcheck → parity → profiling → bundle (manifest) → report, orchestrated by exporters.deploy.
Names are imported on first use, so `import edgesvd` stays light.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgesvd")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"

# Public name → the module that defines it.
_API = {
    "compress": "edgesvd.compression", "Compressed": "edgesvd.compression", "Method": "edgesvd.methods",
    "Plain": "edgesvd.methods", "Asvd": "edgesvd.methods", "Whiten": "edgesvd.methods",
    "Learned": "edgesvd.methods", "DEFAULT_METHOD": "edgesvd.methods",
    "CalibrationConfig": "edgesvd.calibration",
    "load_compressed": "edgesvd.checkpoint", "save_compressed": "edgesvd.checkpoint",
    "CompressionRecord": "edgesvd.checkpoint",
    "LowRankLinear": "edgesvd.factorize", "LayerRecord": "edgesvd.factorize", "break_even_rank": "edgesvd.factorize",
    "load_profile": "edgesvd.profiles",
    "deploy": "edgesvd.exporters.deploy", "DeployConfig": "edgesvd.exporters.deploy",
    "run": "edgesvd.exporters.deploy", "RunConfig": "edgesvd.exporters.deploy",
    "ExportConfig": "edgesvd.exporters.export",
}
__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'edgesvd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
