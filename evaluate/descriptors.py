"""Image descriptors of the copy-detection protocol (docs/protocols.md, "Copy detection"):
GeM pooling and PCA whitening.

* ``gem_pool``: generalised mean of the patch tokens,
  g_d = (1/N sum_n max(x_nd, eps)^p)^(1/p) (p = 4 in the paper; p = 1 is the
  mean of the clamped tokens, p -> inf the max).
* ``copy_detection_descriptor``: [CLS] concatenated with GeM(p=4) of the
  last-layer patch tokens (B, 2D), not normalised.
* ``fit_pca_whitening`` / ``PCAWhitening.apply``: x -> diag(lambda^-1/2) V^T (x - mu),
  all components kept, eigenvalues floored at 1e-5 * max. Like the official
  evaluator, the eigendecomposition is of the UNCENTRED second moment
  M = F^T F / n of the whitening set while mu is still subtracted when the
  transform is applied. What that guarantees (exactly, before flooring):
  the raw whitening features have identity second moment under the linear
  map W = diag(lambda^-1/2) V^T, i.e. (1/n) sum_i (W f_i)(W f_i)^T = I, and
  the transformed set y_i = W (f_i - mu) has zero mean and covariance
  I - m m^T with m = W mu (one direction shrunk, the others white).
  ``centred=True`` decomposes the centred covariance instead (covariance I).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def gem_pool(patch_tokens: torch.Tensor, p: float = 4.0, eps: float = 1e-6) -> torch.Tensor:
    """(B, N, D) tokens -> (B, D): (mean over the N tokens of clamp(x, eps)^p)^(1/p)."""
    if patch_tokens.dim() != 3:
        raise ValueError(f"gem_pool expects (batch, tokens, dim), got shape {tuple(patch_tokens.shape)}")
    return patch_tokens.clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def copy_detection_descriptor(tokens: torch.Tensor, p: float = 4.0) -> torch.Tensor:
    """(B, 1 + N, D) last-block normed tokens -> (B, 2D) = [CLS, GeM_p(patch tokens)]."""
    return torch.cat([tokens[:, 0], gem_pool(tokens[:, 1:], p)], dim=1)


@dataclass
class PCAWhitening:
    """x (.., D) -> (x - mean) @ projection.T; projection rows = eigenvectors / sqrt(eigenvalue), largest first."""
    mean: torch.Tensor        # (D,) float64
    projection: torch.Tensor  # (D, D) float64
    eigenvalues: torch.Tensor  # (D,) float64, decreasing, after flooring

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """Whitened features in the input's dtype and device."""
        whitened = (features.to(torch.float64) - self.mean.to(features.device)) @ self.projection.to(features.device).T
        return whitened.to(features.dtype)


def fit_pca_whitening(features: torch.Tensor, centred: bool = False, floor: float = 1e-5) -> PCAWhitening:
    """Fit on whitening-set features (n, D); see the module docstring for what ``centred`` changes.

    Eigenvalues below floor * max are raised to floor * max, so directions the
    set does not span are scaled by a bounded factor instead of dividing by ~0.
    """
    features = torch.as_tensor(features).to(torch.float64)
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"whitening needs (n >= 2, dim) features, got shape {tuple(features.shape)}")
    mean = features.mean(dim=0)
    basis = features - mean if centred else features
    second_moment = basis.T @ basis / features.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment)
    eigenvalues = eigenvalues.clamp(min=floor * eigenvalues.max().item())
    order = torch.argsort(eigenvalues, descending=True)
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    projection = eigenvectors.T / eigenvalues.sqrt()[:, None]
    return PCAWhitening(mean=mean, projection=projection, eigenvalues=eigenvalues)
