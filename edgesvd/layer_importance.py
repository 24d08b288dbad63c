"""Per-layer importance vectors for the planner: learned importance when present, whitened σ² otherwise."""

from __future__ import annotations

import torch
from torch import nn

from .costmodel import LayerShape
from .importance import importance_order
from .learned import LearnedState
from .methods import Spectrum, whiten_spectrum
from .planner import LayerImportance, component_importance
from .progress import progress_bar
from .statistics import ActivationStats


def layer_shape(model: nn.Module, name: str, dense: nn.Linear | None = None) -> LayerShape:
    """The LayerShape of the (dense) Linear at `name`, or of `dense` standing for it."""
    mod = model.get_submodule(name) if dense is None else dense
    return LayerShape(name, mod.out_features, mod.in_features, mod.bias is not None)


def importance_from_sigma(shape: LayerShape, sigma: torch.Tensor) -> tuple[LayerImportance, torch.Tensor]:
    """The planner's view of one layer and the component order it assumes (most important first):
    keeping rank r means keeping components `order[:r]`."""
    imp, order = component_importance(sigma)
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
            gram = stats.gram_for(name)  # on the compression device: the SVD runs there
            weight = model.get_submodule(name).weight.detach().to(gram.device)
            spec = whiten_spectrum(weight, gram, stats.tokens_for(name))
            li, order = importance_from_sigma(layer_shape(model, name), spec.sigma)
            layers.append(li)
            spectra[name], orders[name] = spec, order
            bar.advance()
    return layers, spectra, orders


def learned_importances(state: LearnedState) -> tuple[list[LayerImportance], dict[str, torch.Tensor],
                                                     dict[str, torch.Tensor]]:
    """The planner's view of one learning pass: every candidate's learned importance along the
    pruning path (see ScoredLowRank.path_importance), the order it implies and the scores to fold.

    Learned importance estimates how much the distillation loss rises when a component goes, so
    it compares across layers as it is; it is only scaled so that all layers together hold
    `len(layers)` (the receipt's "importance kept" is then the share of the total kept). Layers
    have importance for their candidates only: a plan may keep a prefix of them, or the layer dense.
    """
    paths = {name: layer.path_importance() for name, layer in state.scored.items()}
    total = float(sum(imp.double().sum() for imp, _ in paths.values())) or 1.0
    scale = len(paths) / total
    layers, orders, scores = [], {}, {}
    for name in state.targets:
        imp, score = paths[name]
        order = importance_order(imp)
        layers.append(LayerImportance(layer_shape(state.model, name, state.dense[name]),
                                      (imp.double()[order] * scale).cpu().numpy()))
        orders[name], scores[name] = order.cpu(), score.cpu()
    return layers, orders, scores
