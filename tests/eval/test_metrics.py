"""FID and KID math against closed forms: the matrix-square-root trace against scipy.linalg.sqrtm, the Fréchet
distance of two Gaussians, and the unbiasedness of KID against the population MMD of two Gaussians (exact through
the Gaussians' moment tensors up to order 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from ldm.eval.metrics import covariance_factor, fid, frechet_distance, kid, mmd2_unbiased, trace_sqrt_product


def _sqrtm_trace(s1: np.ndarray, s2: np.ndarray) -> float:
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.trace(root).real)


@pytest.mark.parametrize("r1,r2", [(5, 7), (30, 30), (16, 3)])
def test_trace_sqrt_product_matches_scipy_sqrtm(r1, r2):
    g = torch.Generator().manual_seed(r1 * 100 + r2)
    d = 16
    l1 = torch.randn(d, r1, generator=g, dtype=torch.float64)
    l2 = torch.randn(d, r2, generator=g, dtype=torch.float64) + 0.5  # a different, non-commuting covariance
    s1, s2 = (l1 @ l1.T).numpy(), (l2 @ l2.T).numpy()
    assert float(trace_sqrt_product(l1, l2)) == pytest.approx(_sqrtm_trace(s1, s2), rel=1e-6)


@pytest.mark.parametrize("n", [5, 40])  # fewer and more vectors than dimensions
def test_covariance_factor_reproduces_the_sample_covariance(n):
    x = torch.randn(n, 12, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * torch.arange(1, 13)
    factor = covariance_factor(x)
    assert factor.shape == (12, min(n, 12))
    np.testing.assert_allclose((factor @ factor.T).numpy(), np.cov(x.numpy(), rowvar=False), atol=1e-10)


def test_frechet_distance_of_gaussians_closed_form():
    g = torch.Generator().manual_seed(0)
    d = 6
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    a, b = torch.rand(d, generator=g, dtype=torch.float64) + 0.1, torch.rand(d, generator=g, dtype=torch.float64) * 3
    # diagonal covariances commute: d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    exact = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    assert frechet_distance(mu1, torch.diag(a.sqrt()), mu2, torch.diag(b.sqrt())) == pytest.approx(exact, rel=1e-12)
    # general covariances through their Cholesky factors, against scipy's matrix square root
    l1 = torch.tril(torch.randn(d, d, generator=g, dtype=torch.float64))
    l2 = torch.tril(torch.randn(d, d, generator=g, dtype=torch.float64))
    s1, s2 = (l1 @ l1.T).numpy(), (l2 @ l2.T).numpy()
    reference = float((mu1 - mu2).pow(2).sum()) + np.trace(s1) + np.trace(s2) - 2 * _sqrtm_trace(s1, s2)
    assert frechet_distance(mu1, l1, mu2, l2) == pytest.approx(reference, rel=1e-8)
    assert frechet_distance(mu1, l1, mu1, l1) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_samples_approaches_the_population_value():
    g = torch.Generator().manual_seed(1)
    d, n = 8, 20_000
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.full((d,), 0.5, dtype=torch.float64)
    l1 = torch.eye(d, dtype=torch.float64) + 0.3 * torch.tril(torch.randn(d, d, generator=g, dtype=torch.float64), -1)
    l2 = 1.5 * torch.eye(d, dtype=torch.float64)
    x = mu1 + torch.randn(n, d, generator=g, dtype=torch.float64) @ l1.T  # rows ~ N(mu1, l1 l1^T)
    y = mu2 + torch.randn(n, d, generator=g, dtype=torch.float64) @ l2.T
    population = frechet_distance(mu1, l1, mu2, l2)
    assert population > 2.0
    assert fid(x, y) == pytest.approx(population, rel=0.03)
    assert fid(x, x) == pytest.approx(0.0, abs=1e-9)
    assert fid(x[:10], x[:10]) == pytest.approx(0.0, abs=1e-9)  # fewer vectors than dimensions too
    assert fid(x[:10], y[:10]) > fid(x[:10], x[10:20])
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        fid(x[:1], y)
    with pytest.raises(ValueError, match="feature sizes differ"):
        fid(x, y[:, :4])


def _moments(mu: np.ndarray, cov: np.ndarray) -> list[np.ndarray]:
    """E x, E x⊗x, E x⊗x⊗x of N(mu, cov)."""
    m3 = (np.einsum("i,j,k->ijk", mu, mu, mu) + np.einsum("i,jk->ijk", mu, cov) + np.einsum("j,ik->ijk", mu, cov)
          + np.einsum("k,ij->ijk", mu, cov))
    return [mu, np.outer(mu, mu) + cov, m3]


def population_mmd2(mu1, cov1, mu2, cov2) -> float:
    """MMD^2 of two Gaussians under k(x, y) = (x.y/d + 1)^3 = sum_k C(3, k) (x.y/d)^k, with E (x.y)^k for
    independent x, y the inner product of the k-th moment tensors: sum_k C(3, k) d^-k ||M_k(P) - M_k(Q)||^2."""
    d = len(mu1)
    return sum(math.comb(3, k) * d ** -k * float(np.sum((a - b) ** 2))
               for k, (a, b) in enumerate(zip(_moments(mu1, cov1), _moments(mu2, cov2)), start=1))


def test_kid_is_unbiased_for_small_subsets(one_thread):
    g = torch.Generator().manual_seed(2)
    d, size, reps = 4, 10, 3000
    mu2, scale2 = np.array([0.4, -0.2, 0.0, 0.3]), np.array([1.0, 1.3, 0.8, 1.0])
    population = population_mmd2(np.zeros(d), np.eye(d), mu2, np.diag(scale2**2))

    def draw(n):  # n vectors of P = N(0, I) and of Q = N(mu2, diag(scale2^2))
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        return x, torch.from_numpy(mu2) + torch.randn(n, d, generator=g, dtype=torch.float64) * torch.from_numpy(scale2)

    # independent sets of 10: the unbiased estimate averages to the population value ...
    x, y = draw(size * reps)
    unbiased = np.array([mmd2_unbiased(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(reps)])
    se = unbiased.std() / math.sqrt(reps)
    assert abs(unbiased.mean() - population) < 4 * se, (unbiased.mean(), population, se)
    # ... while the biased V-statistic (diagonal kept) is off by many standard errors: the test can tell
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    biased = [float(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean())
              for a, b in zip(x[:3000].split(size), y[:3000].split(size))]
    assert np.mean(biased) - population > 20 * se
    # kid() draws its subsets from large sets: its mean is the population value too, and zero for one distribution
    x, y = draw(20_000)
    mean, std = kid(x, y, subset_size=size, subsets=500, seed=0)
    assert abs(mean - population) < 4 * std / math.sqrt(500)
    same, same_std = kid(x[:10_000], x[10_000:], subset_size=size, subsets=500, seed=1)
    assert abs(same) < 4 * same_std / math.sqrt(500)


def test_mmd2_unbiased_small_case_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    k = lambda a, b: (float(a @ b) / 2 + 1) ** 3  # noqa: E731
    kxx = 2 * k(x[0], x[1]) / 2
    kyy = sum(k(y[i], y[j]) for i in range(3) for j in range(3) if i != j) / 6
    kxy = sum(k(a, b) for a in x for b in y) / 6
    assert mmd2_unbiased(x, y) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-12)
    mean, std = kid(x, y[:2], subset_size=100)  # capped at the set sizes: one subset, the whole sets
    assert mean == pytest.approx(mmd2_unbiased(x, y[:2]), rel=1e-12) and std == 0.0
