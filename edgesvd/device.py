"""Pick the torch device for compression: `auto` uses CUDA when present."""

from __future__ import annotations

import torch

from .errors import DeviceError

DEVICES = ("auto", "cpu", "cuda")


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
