"""evaluate.descriptors: GeM pooling against its formula, PCA whitening against what it guarantees."""
import math

import pytest
import torch

from evaluate.descriptors import copy_detection_descriptor, fit_pca_whitening, gem_pool


def test_gem_matches_its_formula():
    tokens = torch.tensor([[[1.0, -2.0], [3.0, 0.5]]])          # (B=1, N=2, D=2)
    # dim 0: ((1^4 + 3^4) / 2)^(1/4) = 41^(1/4); dim 1: -2 is clamped to 1e-6: ((1e-24 + 0.5^4) / 2)^(1/4)
    expected = torch.tensor([[41 ** 0.25, (0.5 ** 4 / 2) ** 0.25]])
    torch.testing.assert_close(gem_pool(tokens, p=4), expected)
    random = torch.rand(3, 7, 5, dtype=torch.float64) + 0.1
    torch.testing.assert_close(gem_pool(random, p=3), (random ** 3).mean(dim=1) ** (1 / 3))


def test_gem_with_p_one_is_the_mean_of_clamped_tokens():
    tokens = torch.rand(2, 9, 4, dtype=torch.float64)
    torch.testing.assert_close(gem_pool(tokens, p=1), tokens.mean(dim=1))
    assert gem_pool(torch.tensor([[[-1.0], [3.0]]], dtype=torch.float64), p=1).item() == pytest.approx((1e-6 + 3) / 2)


def test_copy_detection_descriptor_is_cls_then_gem():
    tokens = torch.rand(2, 1 + 16, 8)
    descriptor = copy_detection_descriptor(tokens)
    assert descriptor.shape == (2, 16)
    torch.testing.assert_close(descriptor[:, :8], tokens[:, 0])
    torch.testing.assert_close(descriptor[:, 8:], gem_pool(tokens[:, 1:], p=4))


def test_whitening_by_hand_in_two_dimensions():
    # zero-mean set: second moment = covariance = diag((4 + 4)/4, (1 + 1)/4) = diag(2, 0.5).
    features = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-2.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    whitening = fit_pca_whitening(features)
    torch.testing.assert_close(whitening.eigenvalues, torch.tensor([2.0, 0.5], dtype=torch.float64))
    # x -> diag(lambda^-1/2) V^T x: (2, 0) -> (2/sqrt 2, 0), (0, 1) -> (0, 1/sqrt 0.5) (up to eigenvector sign)
    torch.testing.assert_close(whitening.apply(features[:2]).abs(),
                               torch.tensor([[math.sqrt(2), 0.0], [0.0, math.sqrt(2)]], dtype=torch.float64))


def anisotropic_features(n=2000, dim=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    offset = 3.0 * torch.randn(dim, generator=generator, dtype=torch.float64)
    return torch.randn(n, dim, generator=generator, dtype=torch.float64) @ mixing + offset


def test_uncentred_whitening_guarantee():
    # the official variant decomposes M = F^T F / n, so with W = diag(lambda^-1/2) V^T:
    # (1/n) sum (W f)(W f)^T = I exactly, and y = W (f - mu) has mean 0 and covariance I - m m^T, m = W mu.
    features = anisotropic_features()
    whitening = fit_pca_whitening(features)
    mapped = features @ whitening.projection.T
    identity = torch.eye(features.shape[1], dtype=torch.float64)
    torch.testing.assert_close(mapped.T @ mapped / len(features), identity)
    whitened = whitening.apply(features)
    torch.testing.assert_close(whitened.mean(dim=0), torch.zeros(features.shape[1], dtype=torch.float64))
    m = whitening.projection @ whitening.mean
    covariance = whitened.T @ whitened / len(features)
    torch.testing.assert_close(covariance, identity - torch.outer(m, m))
    assert 0.5 < m.norm().item() < 1.0     # a real offset: the set's covariance is not the identity


def test_centred_whitening_gives_identity_covariance():
    features = anisotropic_features()
    whitened = fit_pca_whitening(features, centred=True).apply(features)
    covariance = whitened.T @ whitened / len(features)
    torch.testing.assert_close(covariance, torch.eye(features.shape[1], dtype=torch.float64))


def test_whitening_floors_tiny_eigenvalues_and_keeps_the_dtype():
    features = anisotropic_features(n=3, dim=6)                 # rank <= 3 of 6 dimensions
    whitening = fit_pca_whitening(features)
    assert whitening.eigenvalues.min().item() == pytest.approx(1e-5 * whitening.eigenvalues.max().item())
    whitened = whitening.apply(features.float())
    assert whitened.dtype == torch.float32 and torch.isfinite(whitened).all()
