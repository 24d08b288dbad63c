"""Pick the torch device for compression (`auto` uses CUDA when present) and the precision of its calibration matmuls."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import DeviceError

DEVICES = ("auto", "cpu", "cuda")
# Calibration passes (statistics and propagation) of streamed compression. 'bfloat16' runs the blocks
# under bfloat16 autocast and forms XᵀX from bfloat16-rounded inputs with float32 accumulation and
# output (torch's 'medium' matmul precision; statistics.accumulate keeps autocast off). On a CPU with
# AMX (SmolLM2, one block, 2 threads) the forward runs 2.1× and forward + XᵀX 1.8× faster. The global
# 'medium' precision alone made the Linears 2.7× faster but attention 3× slower (oneDNN's bf16 path
# for its small products), hence autocast, which runs attention itself in bfloat16. Training steps
# (Learned.train_precision) autocast their forward pass only: with the optimizer steps inside one
# autocast region, stories260K's block fine-tuning diverged (local loss 0.17 → 11; PyTorch's advice
# is autocast around forward passes only).
PRECISIONS = ("auto", "float32", "bfloat16")


def resolve_device(name: str = "auto") -> torch.device:
    """torch.device for 'auto', 'cpu' or 'cuda'; DeviceError when CUDA is asked for and absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for but torch sees no CUDA GPU (use --device auto or cpu)")
        return torch.device(name)
    raise DeviceError(f"unknown device '{name}' (choose from {', '.join(DEVICES)})")


def native_bf16(device: torch.device, matrix_units: bool = False) -> bool:
    """Whether `device` multiplies bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with
    AMX or AVX512-BF16 (oneDNN's kernels; elsewhere a bfloat16 matmul is emulated or falls back).
    `matrix_units`: on a CPU, AMX only (where the speed-up was measured; AVX512-BF16 alone was not)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    # Private probes of torch; a torch without them reads as a CPU without bf16.
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return bool(amx or (not matrix_units and avx512_bf16))


def check_precision(name: str, option: str = "--calib-precision") -> str:
    """`name` if it is one of PRECISIONS, else DeviceError."""
    if name not in PRECISIONS:
        raise DeviceError(f"unknown {option} '{name}' (choose from {', '.join(PRECISIONS)})")
    return name


def resolve_precision(name: str, device: torch.device, option: str = "--calib-precision") -> str:
    """'float32' or 'bfloat16' for `name` on `device` ('auto': bfloat16 on a CUDA GPU with bf16 and on
    a CPU with AMX); DeviceError for an unknown name or bfloat16 asked of a device without it."""
    if check_precision(name, option) == "auto":
        return "bfloat16" if native_bf16(device, matrix_units=True) else "float32"
    if name == "bfloat16" and not native_bf16(device):
        raise DeviceError(f"{option} bfloat16: {device.type} here has no native bfloat16 matmul "
                          "(AMX or AVX512-BF16 CPU, or a CUDA GPU with bf16); use auto or float32")
    return name


@contextmanager
def calibration_matmuls(precision: str, device: torch.device) -> Iterator[None]:
    """Inside, forward passes on `device` multiply at `precision` ('bfloat16': autocast, and float32
    matmuls with bfloat16 inputs; 'float32': full precision); the previous settings return on exit."""
    if precision != "bfloat16":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    finally:
        torch.set_float32_matmul_precision(before)


@contextmanager
def training_forward(precision: str, device: torch.device) -> Iterator[None]:
    """Inside, a training step's forward pass runs at `precision` ('bfloat16': autocast; the weights,
    gradients and optimizer states stay float32). Wrap the forward only, never the backward or the step."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        yield
