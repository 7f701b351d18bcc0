"""Sample-quality metrics on feature vectors: FID and KID (math only, float64).

* FID (Heusel et al. 2017) is the Fréchet distance between Gaussians fitted to two feature sets (Dowson & Landau
  1982): ``d^2 = ||mu_1 - mu_2||^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1 S_2)^{1/2})``. With factors ``S_i = L_i L_i^T``
  the non-zero eigenvalues of ``S_1 S_2`` are those of ``(L_1^T L_2)(L_1^T L_2)^T``, so
  ``Tr((S_1 S_2)^{1/2}) = ||L_1^T L_2||_*`` (the nuclear norm). For n feature vectors the centred features give a
  factor of width min(n, d) (a thin QR when n > d), so no d x d matrix square root is ever taken: 2048-d Inception
  features of a few hundred images cost an SVD of a few hundred columns.
* KID (Bińkowski et al. 2018, "Demystifying MMD GANs") is the unbiased estimate ``MMD^2_u`` (Gretton et al. 2012,
  "A kernel two-sample test") under the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over random
  subsets of equal size; it has no bias from the number of samples, unlike FID.
* ``fid_kid_bootstrap``: both against a fixed reference set, with bootstrap standard deviations over the evaluated
  set, the interval the evaluation protocol prints beside every value.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def _as_features(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"{name}: expected at least 2 feature vectors as (N, D), got shape {tuple(x.shape)}")
    return x


def covariance_factor(x: Tensor) -> Tensor:
    """L (D, min(N, D)) with L L^T equal to the unbiased sample covariance of the rows of x (N, D)."""
    x = _as_features(x, "features")
    n, d = x.shape
    centred = x - x.mean(dim=0)  # (N, D)
    if n > d:
        centred = torch.linalg.qr(centred, mode="r").R  # (D, D), R^T R = centred^T centred
    return centred.T / math.sqrt(n - 1)  # (D, r)


def trace_sqrt_product(l1: Tensor, l2: Tensor) -> Tensor:
    """Tr((S_1 S_2)^{1/2}) for S_i = L_i L_i^T: the nuclear norm of L_1^T L_2."""
    return torch.linalg.svdvals(l1.T @ l2).sum()  # (r1, r2) -> singular values


def frechet_distance(mu1: Tensor, l1: Tensor, mu2: Tensor, l2: Tensor) -> float:
    """Fréchet distance between N(mu_1, L_1 L_1^T) and N(mu_2, L_2 L_2^T) (Dowson & Landau 1982)."""
    mean_term = (mu1 - mu2).pow(2).sum()
    d2 = mean_term + l1.pow(2).sum() + l2.pow(2).sum() - 2 * trace_sqrt_product(l1, l2)
    return max(float(d2), 0.0)  # rounding can leave a tiny negative value for identical sets


def fid(x: Tensor, y: Tensor) -> float:
    """FID between feature sets x (N, D) and y (M, D)."""
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    return frechet_distance(x.mean(dim=0), covariance_factor(x), y.mean(dim=0), covariance_factor(y))


def polynomial_kernel(x: Tensor, y: Tensor, degree: int = 3, coef: float = 1.0) -> Tensor:
    """k(x, y) = (x.y / d + coef)^degree for all pairs: (N, M) (the KID kernel with the defaults)."""
    return (x @ y.T / x.shape[1] + coef) ** degree


def mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """MMD^2_u (Gretton et al. 2012): within-set kernel means without the diagonal, minus twice the cross mean."""
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def kid(x: Tensor, y: Tensor, subset_size: int = 1000, subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation of MMD^2_u over random subsets (without replacement within a subset).

    The subset size is capped by the smaller set; when both sets are that small every subset is the whole set.
    """
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2 or subsets < 1:
        raise ValueError(f"KID needs subsets of at least 2 vectors and at least one subset, got {size} and {subsets}")
    if size == x.shape[0] == y.shape[0]:
        subsets = 1  # every subset would be the whole of both sets
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        i = torch.randperm(x.shape[0], generator=g)[:size]
        j = torch.randperm(y.shape[0], generator=g)[:size]
        values.append(mmd2_unbiased(x[i], y[j]))
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), float(v.std(unbiased=True)) if len(values) > 1 else 0.0


def fid_kid_bootstrap(x: Tensor, y: Tensor, reps: int = 50, seed: int = 0) -> dict[str, float]:
    """FID and KID (MMD^2_u over the whole sets) of x against y, with bootstrap standard deviations over x.

    y is the fixed reference set; x is resampled with replacement ``reps`` times (Efron 1979), so ``fid_sd`` and
    ``kid_sd`` are the spread that comes from which images of x happened to be drawn, what differs between two
    evaluations of the same generator. Resampling repeats images, which biases each replicate upward; the
    intervals are therefore centred on the full-sample values (value +/- 1.96 sd), not on the replicates.
    """
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    n, m = x.shape[0], y.shape[0]
    mu_y, l_y = y.mean(dim=0), covariance_factor(y)
    kxx, kxy, kyy = polynomial_kernel(x, x), polynomial_kernel(x, y), polynomial_kernel(y, y)
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))

    def scores(rows: Tensor) -> tuple[float, float]:
        xs = x[rows]
        k = kxx[rows][:, rows]
        within_x = (k.sum() - k.diagonal().sum()) / (n * (n - 1))
        mmd = within_x + within_y - 2 * kxy[rows].mean()
        return frechet_distance(xs.mean(dim=0), covariance_factor(xs), mu_y, l_y), float(mmd)

    fid_value, kid_value = scores(torch.arange(n))
    out = {"fid": fid_value, "kid": kid_value, "fid_sd": float("nan"), "kid_sd": float("nan")}
    if reps >= 2:
        g = torch.Generator().manual_seed(seed)
        values = torch.tensor([scores(torch.randint(0, n, (n,), generator=g)) for _ in range(reps)],
                              dtype=torch.float64)  # (reps, 2)
        out["fid_sd"], out["kid_sd"] = (float(v) for v in values.std(dim=0, unbiased=True))
    return out
