"""Spectra: a weight and its input statistics → singular components (plain, asvd or whitened SVD)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError
from .reporting import SILENT, Reporter
from .statistics import ActivationStats, Projected, output_side

SPECTRA = ("plain", "asvd", "whiten")


@dataclass
class Spectrum:
    """W ≈ left · diag(sigma) · right, components sorted by decreasing sigma.

    `left` is out×k with orthonormal columns (for `curvature_spectrum` the left singular vectors
    mapped back through the output transform), `right` is k×in (for `whiten`, `asvd` and
    `curvature_spectrum` the right singular vectors mapped back through the input transform). All float64.
    """

    left: torch.Tensor
    sigma: torch.Tensor
    right: torch.Tensor

    def cpu(self) -> "Spectrum":
        return Spectrum(self.left.cpu(), self.sigma.cpu(), self.right.cpu())

    def factors(self, rank: int, scores: torch.Tensor | None = None,
                index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r×in) and B (out×r) of the components `index` (default: the top `rank`).

        `scores` (one per component of the full spectrum) multiply the singular values; the
        scaled value is split as a square root over both factors so neither side carries the
        whole dynamic range (that matters once exported to fp16).
        """
        idx = torch.arange(rank, device=self.sigma.device) if index is None else index
        s = self.sigma[idx] if scores is None else self.sigma[idx] * scores[idx].to(self.sigma)
        sign = torch.where(s < 0, -1.0, 1.0).to(s)
        root = s.abs().sqrt()
        a = (root * sign)[:, None] * self.right[idx]
        b = self.left[:, idx] * root[None, :]
        return a, b

    def output_rms(self, index: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """Relative size of each output of the components `index` on the data the spectrum was
        computed for: ‖left·diag(σ·s)‖ per row. Exact for whitened and curvature spectra (their
        components are uncorrelated with unit variance on the calibration data); for plain ones the row norms of
        the truncated weight, i.e. isotropic inputs."""
        s = self.sigma[index] if scores is None else self.sigma[index] * scores[index].to(self.sigma)
        return (self.left[:, index] * s[None, :]).norm(dim=1)


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u, s, vh


def plain_spectrum(weight: torch.Tensor) -> Spectrum:
    """Magnitude SVD of the weight itself: ignores the data."""
    u, s, vh = _svd(weight.double())
    return Spectrum(u, s, vh)


def _input_diagonal(gram: torch.Tensor | Projected) -> torch.Tensor:
    return gram.diagonal if isinstance(gram, Projected) else gram.diagonal()


def asvd_spectrum(weight: torch.Tensor, gram: torch.Tensor | Projected, tokens: int, alpha: float = 0.5) -> Spectrum:
    """Activation-aware SVD: scale input channels by (RMS activation)^alpha before the SVD."""
    rms = (_input_diagonal(gram).clamp_min(0) / max(tokens, 1)).sqrt()
    scale = rms.clamp_min(rms.max() * 1e-6 + 1e-12) ** alpha
    u, s, vh = _svd(weight.double() * scale[None, :])
    return Spectrum(u, s, vh / scale[None, :])


def whitening_factor(gram: torch.Tensor | Projected, tokens: int, damp: float = 1e-2,
                     max_tries: int = 8) -> torch.Tensor:
    """Lower-triangular L with L·Lᵀ = XᵀX/n + λI, λ = damp·mean(diag).

    The damping is multiplied by 10 until the Cholesky factorization succeeds, so a singular
    XᵀX (dead channels, too few tokens) still gives a usable factor. Statistics kept as W·XᵀX·Wᵀ
    (Projected) have no XᵀX: they serve only the out ≤ in routes, which never need L.
    """
    if isinstance(gram, Projected):
        raise ValueError("this spectrum needs XᵀX, not W·XᵀX·Wᵀ (which serves layers with out ≤ in only)")
    g = gram.double() / max(tokens, 1)
    mean_diag = g.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for attempt in range(max_tries):
        lam = damp * (10.0 ** attempt) * mean_diag
        chol, info = torch.linalg.cholesky_ex(g + lam * eye)
        if int(info) == 0:
            return chol
    raise RuntimeError("input statistics are not positive definite even after heavy damping")


def _canonical_signs(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each component's sign fixed so that the largest entry (in magnitude) of its left vector is
    positive: eigen- and SVD solvers may flip any pair, and fixed signs make CPU, GPU and
    multi-process runs comparable factor by factor."""
    pick = left.abs().argmax(dim=0)
    sign = torch.sign(left[pick, torch.arange(left.shape[1], device=left.device)])
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return left * sign[None, :], right * sign[:, None]


def _descending_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (square roots of the eigenvalues, clamped at 0) and eigenvectors, largest first."""
    ev, vec = torch.linalg.eigh(matrix)
    return ev.flip(0).clamp_min(0).sqrt(), vec.flip(1)


def _whitened_product(w: torch.Tensor, gram: torch.Tensor | Projected, tokens: int, damp: float) -> torch.Tensor:
    """W·(XᵀX/n + λI)·Wᵀ (out×out, float64), λ = damp·mean(diag(XᵀX/n)) as in whitening_factor: from
    XᵀX, or as summed already (Projected). No damped copy of the in×in matrix is made (0.5 GB for an
    8192-wide input, most of the streamed path's peak at the 1.3B shape)."""
    n = max(tokens, 1)
    lam = damp * (_input_diagonal(gram).mean() / n).clamp_min(1e-12)
    product = gram.product.clone() if isinstance(gram, Projected) else (w @ gram.double()) @ w.T
    return product.div_(n).add_(w @ w.T, alpha=float(lam))


def whiten_spectrum(weight: torch.Tensor, gram: torch.Tensor | Projected, tokens: int, damp: float = 1e-2) -> Spectrum:
    """Truncation-aware whitening (SVD-LLM): the SVD of W·L (L·Lᵀ = XᵀX/n + λI), right factors mapped
    back by L⁻¹. Truncating it minimises the error of the layer's *output* on the calibration inputs.

    Computed through one symmetric eigendecomposition of min(out, in) size instead of an SVD (1.5–3.8×
    faster on SmolLM2's shapes, the same truncated weights to 1e-13): for out ≤ in, (W·L)(W·L)ᵀ = W·Ĝ·Wᵀ
    gives U and σ² with no Cholesky at all, and the right factors are Σ⁻¹·Uᵀ·W (a Projected `gram`,
    W·XᵀX·Wᵀ summed during calibration, gives the same without the out·in² product); for out > in,
    the eigenvectors V of (W·L)ᵀ(W·L) give U = W·L·V/σ and the right factors Vᵀ·L⁻¹ (a triangular
    solve, L⁻¹ never formed). Squaring the matrix squares its condition number, hence float64
    throughout; components lost to that are the smallest ones, which truncation drops anyway.
    """
    w = weight.double()
    out_f, in_f = w.shape
    if out_f <= in_f:
        sigma, left = _descending_eigh(_whitened_product(w, gram, tokens, damp))
        right = (left.T @ w) / sigma.clamp_min(sigma[0] * 1e-12)[:, None]
    else:
        chol = whitening_factor(gram, tokens, damp)
        m = w @ chol
        sigma, v = _descending_eigh(m.T @ m)
        left = (m @ v) / sigma.clamp_min(sigma[0] * 1e-12)[None, :]
        right = torch.linalg.solve_triangular(chol, v.T, upper=False, left=False)
    left, right = _canonical_signs(left, right)
    return Spectrum(left, sigma, right)


def curvature_spectrum(weight: torch.Tensor, gram: torch.Tensor | Projected, tokens: int, out_gram: torch.Tensor,
                       out_samples: int | None = None, damp: float = 1e-2) -> Spectrum:
    """Kronecker-factored curvature (K-FAC; KFAC-SVD): the SVD of L_Gᵀ·W·L_A, where L_A·L_Aᵀ = XᵀX/n + λI
    as in whitening and L_G·L_Gᵀ the Gram matrix of the loss gradients at the layer's outputs, scaled to
    a unit mean diagonal (+ λI). With the Fisher approximated by G ⊗ A, a change ΔW raises the loss by
    about ½‖L_Gᵀ·ΔW·L_A‖², so truncating this SVD drops the components the *loss* needs least, where
    whitening (G = I) drops those the layer's output needs least. Left factors L_G⁻ᵀ·U, right factors
    Vᵀ·L_A⁻¹ (triangular solves; for out ≤ in U and σ come from the eigendecomposition of K·Kᵀ, K = L_Gᵀ·W·L_A,
    as in whitening, which is also what a Projected `gram` allows); the unit-diagonal scaling keeps both factors near whitening's scale
    (Adam fine-tunes them with one learning rate). `out_samples`, the gradient terms summed into
    `out_gram` when they are random draws, shrinks it toward I by d/(d + out_samples) (d = out): an
    estimate from few draws of a wide output weighs a few random directions, so it is taken mostly as
    identity (whitening); from many it is taken almost as it is."""
    w = weight.double()
    out_gram = out_gram.double() / out_gram.diagonal().mean().clamp_min(1e-300)
    if out_samples is not None:
        shrink = out_gram.shape[0] / (out_gram.shape[0] + out_samples)
        eye = torch.eye(out_gram.shape[0], dtype=out_gram.dtype, device=out_gram.device)
        out_gram = (1 - shrink) * out_gram + shrink * eye
    lg = whitening_factor(out_gram, 1, damp)
    if w.shape[0] <= w.shape[1]:
        # K·Kᵀ = L_Gᵀ·W·Ĝ·Wᵀ·L_G for K = L_Gᵀ·W·L_A: U and σ² from its eigendecomposition, as whitening's
        # out ≤ in branch, and the right factors Vᵀ·L_A⁻¹ = Σ⁻¹·Uᵀ·L_Gᵀ·W, so L_A is never needed.
        sigma, u = _descending_eigh(lg.T @ _whitened_product(w, gram, tokens, damp) @ lg)
        right = (u.T @ lg.T @ w) / sigma.clamp_min(sigma[0] * 1e-12)[:, None]
    else:
        la = whitening_factor(gram, tokens, damp)
        u, sigma, vh = torch.linalg.svd(lg.T @ w @ la, full_matrices=False)
        right = torch.linalg.solve_triangular(la, vh, upper=False, left=False)
    left = torch.linalg.solve_triangular(lg.T, u, upper=True)
    left, right = _canonical_signs(left, right)
    return Spectrum(left, sigma, right)


def factorization_cost(out_features: int, in_features: int) -> float:
    """Relative work of one layer's spectrum: the products with the input's XᵀX (out·in², none where
    the statistics are summed as W·XᵀX·Wᵀ), the ones with W (out·in·min(out, in)) and the symmetric
    eigendecomposition (min(out, in)³), to share a block's layers among ranks."""
    narrow = float(min(out_features, in_features))
    with_gram = 0.0 if output_side(out_features, in_features) else float(out_features) * in_features**2
    return with_gram + float(out_features) * in_features * narrow + narrow**3


def spectrum(method: str, weight: torch.Tensor, gram: torch.Tensor | Projected | None, tokens: int) -> Spectrum:
    """The spectrum of `weight` under `method` ('plain', 'asvd' or 'whiten')."""
    if method == "plain":
        return plain_spectrum(weight)
    if gram is None:
        raise ConfigError(f"method '{method}' needs activation statistics")
    if method == "asvd":
        return asvd_spectrum(weight, gram, tokens)
    if method == "whiten":
        return whiten_spectrum(weight, gram, tokens)
    raise ConfigError(f"unknown method '{method}' (choose from {', '.join(SPECTRA)})")


def layer_spectrum(model: nn.Module, name: str, method: str, stats: ActivationStats | None) -> Spectrum:
    """The spectrum of the Linear at `name` under `method`, on the device of its statistics."""
    weight = model.get_submodule(name).weight.detach()
    gram = stats.gram_for(name) if stats is not None else None
    tokens = stats.tokens_for(name) if stats is not None else 0
    return spectrum(method, weight.to(gram.device) if gram is not None else weight, gram, tokens)


def spectra_of(model: nn.Module, targets: list[str], method: str, stats: ActivationStats | None,
               reporter: Reporter = SILENT) -> dict[str, Spectrum]:
    """The spectrum of every target under `method`, with a progress bar."""
    out = {}
    with reporter.progress(f"spectra ({method})", total=len(targets)) as bar:
        for name in targets:
            out[name] = layer_spectrum(model, name, method, stats)
            bar.advance()
    return out
