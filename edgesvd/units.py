"""Units: bytes per parameter at each precision, and human-readable bytes and milliseconds."""

from __future__ import annotations

PRECISIONS = ("fp32", "fp16", "int8", "int4")
# Bytes on disk per parameter of a weight matrix (MatMul weights, embedding tables) as edgesvd
# exports it: int8 is onnxruntime's dynamic quantization (embedding tables uint8 too), int4 is
# 4-bit blocks of 32 with one float32 scale each (MatMulNBits, GatherBlockQuantized): 0.5 + 4/32.
BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "int8": 1, "int4": 0.625}
# Bytes per output column of a quantized MatMul weight: int8 per-channel scale (float32) and zero point.
BYTES_PER_COLUMN = {"fp32": 0, "fp16": 0, "int8": 5, "int4": 0}
# Bytes per parameter of a bias or norm: weight quantization leaves them in float32.
BYTES_PER_VECTOR_PARAM = {"fp32": 4, "fp16": 2, "int8": 4, "int4": 4}


def fmt_bytes(n: float | None) -> str:
    """`1.23 MB`-style text for a byte count (decimal units, as disks and specs use); '–' for an unknown one."""
    if n is None:
        return "–"
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_ms(t: float | None) -> str:
    """`12.34 ms`; '–' for an unknown time."""
    return "–" if t is None else f"{t:.2f} ms"


def fmt_int(n: int) -> str:
    """`22,713,216`."""
    return f"{n:,}"


def fmt_quantity(key: str, value: float | None) -> str:
    """A budgeted quantity as text: milliseconds for `latency_*` keys, bytes otherwise."""
    return fmt_ms(value) if key.startswith("latency") else fmt_bytes(value)
