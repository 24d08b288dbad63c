"""Choose the Linear layers to compress (block membership, include/exclude patterns)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

import torch
from torch import nn

from .errors import NoTargetError

# A module lives inside a transformer block when its qualified name passes through a ModuleList
# index (encoder.layer.3.…, model.layers.0.…, transformer.h.11.…, model.decoder.layers.2.…).
_IN_BLOCK = re.compile(r"(^|\.)\d+\.")


def linearize_conv1d(model: nn.Module) -> nn.Module:
    """Replace GPT-2 style `Conv1D` (weight in×out) by an equivalent `nn.Linear`, in place.

    Everything downstream (statistics, factorization, export) then deals with one layer type.
    """
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return model
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            in_f, out_f = module.weight.shape
            linear = nn.Linear(in_f, out_f, bias=module.bias is not None,
                               device=module.weight.device, dtype=module.weight.dtype)
            if module.weight.device.type != "meta":
                with torch.no_grad():
                    linear.weight.copy_(module.weight.t())
                    if module.bias is not None:
                        linear.bias.copy_(module.bias)
            set_submodule(model, name, linear)
    return model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def select_targets(model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[str]:
    """Qualified names of the Linear layers to compress, in module order.

    Default: every nn.Linear inside a transformer block. `include` glob patterns add layers
    (e.g. "lm_head"), `exclude` patterns remove them; exclusion wins.
    """
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        wanted = bool(_IN_BLOCK.search(name + ".")) or any(fnmatch.fnmatchcase(name, p) for p in include)
        if wanted and not any(fnmatch.fnmatchcase(name, p) for p in exclude):
            names.append(name)
    if not names:
        raise NoTargetError(
            "no Linear layer to compress: none inside transformer blocks matched "
            f"(include={list(include)}, exclude={list(exclude)})"
        )
    return names
