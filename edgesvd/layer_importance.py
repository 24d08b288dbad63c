"""Per-layer importance vectors for the planner: learned scores × σ when present, whitened σ otherwise."""

from __future__ import annotations

import torch
from torch import nn

from .costmodel import LayerShape
from .methods import Spectrum, whiten_spectrum
from .planner import LayerImportance, component_importance
from .progress import progress_bar
from .statistics import ActivationStats


def layer_shape(model: nn.Module, name: str) -> LayerShape:
    """The LayerShape of the (dense) Linear at `name`."""
    mod = model.get_submodule(name)
    return LayerShape(name, mod.out_features, mod.in_features, mod.bias is not None)


def importance_from_sigma(shape: LayerShape, sigma: torch.Tensor, scores: torch.Tensor | None = None
                          ) -> tuple[LayerImportance, torch.Tensor]:
    """The planner's view of one layer and the component order it assumes (most important first):
    keeping rank r means keeping components `order[:r]`."""
    imp, order = component_importance(sigma, scores)
    return LayerImportance(shape, imp), torch.as_tensor(order.copy())


def whitened_importances(model: nn.Module, targets: list[str], stats: ActivationStats,
                         show_progress: bool = True) -> tuple[list[LayerImportance], dict[str, Spectrum],
                                                              dict[str, torch.Tensor]]:
    """Whitened spectra of every target (SVD of W·L) and the importances the planner reads.

    Returns the importances, the spectra (to factorize with later, no second SVD) and each layer's
    component order.
    """
    layers, spectra, orders = [], {}, {}
    with progress_bar("spectra (whiten)", total=len(targets), enabled=show_progress) as bar:
        for name in targets:
            weight = model.get_submodule(name).weight.detach()
            spec = whiten_spectrum(weight, stats.gram_for(name), stats.tokens_for(name))
            li, order = importance_from_sigma(layer_shape(model, name), spec.sigma)
            layers.append(li)
            spectra[name], orders[name] = spec, order
            bar.advance()
    return layers, spectra, orders
