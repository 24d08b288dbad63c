"""edgesvd: learned low-rank compression of transformer models for edge devices."""

__version__ = "0.1.0"

from .calibration import CalibrationConfig  # noqa: E402
from .checkpoint import CompressionRecord, LayerRecord, load_compressed, save_compressed  # noqa: E402
from .compress import CompressConfig, compress  # noqa: E402
from .lowrank import LowRankLinear, break_even_rank  # noqa: E402

__all__ = ["CalibrationConfig", "CompressConfig", "CompressionRecord", "LayerRecord", "LowRankLinear",
           "break_even_rank", "compress", "load_compressed", "save_compressed", "__version__"]
