"""Distances between sets of feature vectors, and similarities between pairs of volumes.

Set metrics take two feature matrices, ``real`` (N, F) and ``fake`` (M, F), and
return floats; they know nothing about volumes or backbones. Pair metrics (SSIM,
PSNR, MS-SSIM) take volume batches (B, 1, D, H, W) in [0, 1] and return one value
per pair.

    >>> metrics = set_metrics(real_features, fake_features)   # fd, kid, mmd, precision, recall, density, coverage
    >>> frechet_distance(real_features, fake_features)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import PSNRMetric, SSIMMetric
from monai.metrics.regression import compute_ms_ssim, compute_ssim_and_cs
from scipy.spatial.distance import cdist

# Which way is better, for the report and for the sanity checks.
LOWER_IS_BETTER = {"fd": True, "kid": True, "mmd": True, "precision": False, "recall": False, "density": False,
                   "coverage": False}
SET_METRICS = tuple(LOWER_IS_BETTER)
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003
# Every MS-SSIM in a report uses one window: 7 voxels with sigma 1.0 keeps the standard 11-voxel /
# 1.5 ratio (+-3 sigma) and lets 3 scales fit the 4 mm grid's 40 voxels.
MS_SSIM_WINDOW = 7
MS_SSIM_SIGMA = 1.0


def _as_matrix(features: np.ndarray, name: str) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name}: expected a feature matrix (N, F), got shape {features.shape}")
    if len(features) < 2:
        raise ValueError(f"{name}: need at least 2 feature vectors, got {len(features)}")
    if not np.isfinite(features).all():
        raise ValueError(f"{name}: feature matrix contains NaN or infinite values")
    return features


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula).

    FD = ||mu_r - mu_f||^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^(1/2))

    with unbiased covariances S = Xc^T Xc / (N - 1). The trace of the matrix square
    root is computed exactly without forming F x F matrices: the non-zero eigenvalues
    of S_r S_f are the squared singular values of Xc_r Xc_f^T / sqrt((N-1)(M-1)), so
    tr((S_r S_f)^(1/2)) is that (N, M) matrix's nuclear norm. This is exact, stable
    when F > N (singular covariances) and costs O(N M F).
    """
    real, fake = _as_matrix(real, "real"), _as_matrix(fake, "fake")
    real_centred = real - real.mean(0)
    fake_centred = fake - fake.mean(0)
    scale = math.sqrt((len(real) - 1) * (len(fake) - 1))
    trace_real = float((real_centred**2).sum()) / (len(real) - 1)
    trace_fake = float((fake_centred**2).sum()) / (len(fake) - 1)
    trace_sqrt_product = float(np.linalg.svd(real_centred @ fake_centred.T, compute_uv=False).sum()) / scale
    mean_difference = float(((real.mean(0) - fake.mean(0)) ** 2).sum())
    return max(mean_difference + trace_real + trace_fake - 2.0 * trace_sqrt_product, 0.0)


def frechet_distance_from_statistics(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """The same Fréchet distance from stored means and covariances (e.g. published reference statistics).

    tr((S_a S_b)^(1/2)) = tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), a symmetric PSD matrix, so
    both roots come from symmetric eigendecompositions (no complex sqrtm).
    """
    eigenvalues, eigenvectors = np.linalg.eigh(np.asarray(cov_a, np.float64))
    sqrt_a = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    middle = sqrt_a @ np.asarray(cov_b, np.float64) @ sqrt_a
    trace_sqrt_product = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())
    mean_difference = float(((np.asarray(mean_a) - np.asarray(mean_b)) ** 2).sum())
    return max(mean_difference + float(np.trace(cov_a)) + float(np.trace(cov_b)) - 2.0 * trace_sqrt_product, 0.0)


def _unbiased_mmd2(kernel_real: np.ndarray, kernel_fake: np.ndarray, kernel_cross: np.ndarray) -> float:
    """MMD^2_u = mean_{i!=j} k(x_i,x_j) + mean_{i!=j} k(y_i,y_j) - 2 mean_{i,j} k(x_i,y_j)  (Gretton et al. 2012)."""
    n, m = len(kernel_real), len(kernel_fake)
    within_real = (kernel_real.sum() - np.trace(kernel_real)) / (n * (n - 1))
    within_fake = (kernel_fake.sum() - np.trace(kernel_fake)) / (m * (m - 1))
    return float(within_real + within_fake - 2.0 * kernel_cross.mean())


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, degree: int = 3) -> float:
    """KID (Bińkowski et al. 2018): unbiased MMD^2 with the polynomial kernel k(x, y) = (x.y / F + 1)^degree.

    Unbiased, so it is centred on 0 for two samples of one distribution (it can be
    slightly negative) and usable at small N; computed on the whole given sample
    (the bootstrap supplies the spread) instead of the usual fixed-size subsets.
    """
    real, fake = _as_matrix(real, "real"), _as_matrix(fake, "fake")
    dimension = real.shape[1]

    def kernel(a, b):
        return (a @ b.T / dimension + 1.0) ** degree

    return _unbiased_mmd2(kernel(real, real), kernel(fake, fake), kernel(real, fake))


def median_bandwidth(features: np.ndarray) -> float:
    """Median heuristic: the median Euclidean distance between distinct rows of `features`."""
    features = _as_matrix(features, "features")
    distances = cdist(features, features)
    upper = distances[np.triu_indices(len(features), k=1)]
    bandwidth = float(np.median(upper))
    return bandwidth if bandwidth > 0 else 1.0


def maximum_mean_discrepancy(real: np.ndarray, fake: np.ndarray, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 with a Gaussian kernel k(x, y) = exp(-||x - y||^2 / (2 sigma^2)).

    sigma defaults to the median heuristic on the pooled sample; pass a fixed
    `bandwidth` to compare several MMDs on one scale (evaluation fixes it from the
    real evaluation split).
    """
    real, fake = _as_matrix(real, "real"), _as_matrix(fake, "fake")
    if bandwidth is None:
        bandwidth = median_bandwidth(np.concatenate([real, fake]))
    gamma = 1.0 / (2.0 * bandwidth**2)

    def kernel(a, b):
        return np.exp(-gamma * cdist(a, b, "sqeuclidean"))

    return _unbiased_mmd2(kernel(real, real), kernel(fake, fake), kernel(real, fake))


def _kth_neighbour_radius(distances_within: np.ndarray, nearest_k: int) -> np.ndarray:
    # Row i's (k+1)-th smallest distance: the first is its distance to itself (0).
    return np.partition(distances_within, nearest_k, axis=1)[:, nearest_k]


def precision_recall_density_coverage(real: np.ndarray, fake: np.ndarray, nearest_k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of Naeem et al. 2020 with k-nearest-neighbour balls.

    With B(x, r_k(x)) the ball around x reaching its k-th nearest neighbour in its own set:
      precision = share of fakes inside some real ball
      recall    = share of reals inside some fake ball
      density   = (1 / (k M)) sum_j #{real i : fake j in B(real i)}      (can exceed 1)
      coverage  = share of reals whose ball holds at least one fake
    Strict inequalities, Euclidean distances, as in the reference `prdc` package, which the tests
    check it against; it is not called at run time because it prints on every call (the bootstrap
    makes hundreds) and pulls in scikit-learn for one distance matrix.
    """
    real, fake = _as_matrix(real, "real"), _as_matrix(fake, "fake")
    if min(len(real), len(fake)) <= nearest_k:
        raise ValueError(f"nearest_k={nearest_k} needs more than {nearest_k} real and fake vectors, "
                         f"got {len(real)} and {len(fake)}; lower nearest_k or use more volumes")
    real_radius = _kth_neighbour_radius(cdist(real, real), nearest_k)  # (N,)
    fake_radius = _kth_neighbour_radius(cdist(fake, fake), nearest_k)  # (M,)
    cross = cdist(real, fake)  # (N, M)
    inside_real_ball = cross < real_radius[:, None]
    return {
        "precision": float(inside_real_ball.any(axis=0).mean()),
        "recall": float((cross < fake_radius[None, :]).any(axis=1).mean()),
        "density": float(inside_real_ball.sum(axis=0).mean() / nearest_k),
        "coverage": float((cross.min(axis=1) < real_radius).mean()),
    }


def set_metrics(real: np.ndarray, fake: np.ndarray, nearest_k: int = 5, mmd_bandwidth: float | None = None) -> dict[str, float]:
    """All set metrics at once: fd, kid, mmd, precision, recall, density, coverage."""
    values = {
        "fd": frechet_distance(real, fake),
        "kid": kernel_inception_distance(real, fake),
        "mmd": maximum_mean_discrepancy(real, fake, mmd_bandwidth),
    }
    values.update(precision_recall_density_coverage(real, fake, nearest_k))
    return values


# ----------------------------------------------------------------------------- pairs of volumes


def _as_batch(volumes, name: str, allow_2d: bool = False) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(volumes) if not isinstance(volumes, torch.Tensor) else volumes).float()
    if tensor.ndim == 3:
        tensor = tensor[None, None]  # (1, 1, D, H, W)
    if tensor.ndim != 5 and not (allow_2d and tensor.ndim == 4):
        raise ValueError(f"{name}: expected a volume (D, H, W) or a batch (B, C, D, H, W), got shape {tuple(tensor.shape)}")
    return tensor


def ssim(volumes_a, volumes_b, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """3D SSIM per pair (B,), MONAI's SSIMMetric: Gaussian window, population (co)variances,
    K1 = 0.01, K2 = 0.03, mean over the valid (unpadded) region. Matches scikit-image's
    structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)."""
    a, b = _as_batch(volumes_a, "volumes_a"), _as_batch(volumes_b, "volumes_b")
    metric = SSIMMetric(spatial_dims=3, data_range=data_range, kernel_type="gaussian", win_size=window,
                        kernel_sigma=sigma, k1=0.01, k2=0.03, reduction="none")
    return metric(a, b).reshape(-1).numpy().astype(np.float64)


def psnr(volumes_a, volumes_b, data_range: float = 1.0) -> np.ndarray:
    """PSNR per pair (B,): 10 log10(data_range^2 / MSE), MONAI's PSNRMetric."""
    a, b = _as_batch(volumes_a, "volumes_a"), _as_batch(volumes_b, "volumes_b")
    return PSNRMetric(max_val=data_range, reduction="none")(a, b).reshape(-1).numpy().astype(np.float64)


def ms_ssim_settings(shape: Sequence[int], window: int = MS_SSIM_WINDOW, sigma: float = MS_SSIM_SIGMA) -> dict:
    """The scales of every MS-SSIM in mriflow, from the smallest side n = min(shape) and the window w:

        S = the largest S <= 5 with  n // 2^(S-1) >= w  and  n // max(1, S-1)^2 >= w

    The first condition keeps a whole window in the coarsest scale; the second is the size
    check of MONAI's compute_ms_ssim, which computes it (stricter than the first only at
    S = 4, for n in 56..62 when w = 7). The weights are the first S of Wang et al.'s,
    renormalised to sum to 1. With w = 7: 40 x 48 x 40 -> 3 scales, 80 x 96 x 80 -> 4,
    160 x 192 x 160 -> 5. A volume smaller than the window is refused.

    Returns {"window", "sigma", "scales", "weights"}, the form reports print.
    """
    smallest = min(shape)
    for scales in range(len(MS_SSIM_WEIGHTS), 0, -1):
        if smallest // 2 ** (scales - 1) >= window and smallest // max(1, scales - 1) ** 2 >= window:
            weights = np.asarray(MS_SSIM_WEIGHTS[:scales])
            return {"window": window, "sigma": sigma, "scales": scales,
                    "weights": [float(w) for w in weights / weights.sum()]}
    raise ValueError(f"volumes of shape {tuple(shape)} are too small for MS-SSIM with a {window}-voxel window: "
                     f"need at least {window} voxels along every axis")


def ms_ssim(volumes_a, volumes_b, window: int = MS_SSIM_WINDOW, sigma: float = MS_SSIM_SIGMA,
            weights: Sequence[float] | None = None, data_range: float = 1.0, mask=None) -> np.ndarray:
    """Multi-scale SSIM per pair (B,) (Wang et al. 2003), in 2D or 3D.

    MS-SSIM = prod_{s<S} relu(cs_s)^w_s * relu(ssim_S)^w_S, halving the resolution (2x average
    pooling) between scales; SSIM terms with a Gaussian window, K1 = 0.01, K2 = 0.03, over the
    valid (unpadded) region. `weights` default to `ms_ssim_settings(shape, window)`; more
    scales than that rule allows are refused.

    Without a mask this is MONAI's compute_ms_ssim (MultiScaleSSIMMetric). With a `mask`
    (B or 1, 1, *spatial) the per-scale means run over the mask's voxels in the valid region
    instead, the mask average-pooled and thresholded at 0.5 between scales; no library takes a
    mask, so the per-scale maps come from MONAI's compute_ssim_and_cs and the pyramid is
    MONAI's (an all-ones mask gives the unmasked value, tested).
    """
    a, b = _as_batch(volumes_a, "volumes_a", allow_2d=True), _as_batch(volumes_b, "volumes_b", allow_2d=True)
    if a.shape != b.shape:
        raise ValueError(f"volumes_a and volumes_b differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    spatial_dims = a.ndim - 2
    allowed = ms_ssim_settings(a.shape[2:], window, sigma)
    weights = allowed["weights"] if weights is None else [float(w) for w in weights]
    if len(weights) > allowed["scales"]:
        raise ValueError(f"volume of shape {tuple(a.shape[2:])} is too small for {len(weights)} MS-SSIM scales with "
                         f"window {window}; ms_ssim_settings allows {allowed['scales']}")
    if mask is None:
        values = compute_ms_ssim(a, b, spatial_dims, data_range, kernel_size=window, kernel_sigma=sigma, weights=weights)
        return values.reshape(-1).double().cpu().numpy()
    mask = _as_batch(mask, "mask", allow_2d=True).float()
    pool = F.avg_pool3d if spatial_dims == 3 else F.avg_pool2d
    terms = []
    for scale in range(len(weights)):
        ssim_map, cs_map = compute_ssim_and_cs(a, b, spatial_dims, (window,) * spatial_dims, (sigma,) * spatial_dims,
                                               data_range=data_range)
        last = scale == len(weights) - 1
        terms.append(torch.relu(valid_region_mean(ssim_map if last else cs_map, mask, window)))
        if not last:
            a, b, mask = pool(a, 2), pool(b, 2), (pool(mask, 2) >= 0.5).float()
    stacked = torch.stack(terms).double().cpu()  # (S, B)
    return torch.prod(stacked ** torch.tensor(weights, dtype=torch.float64)[:, None], dim=0).numpy()


def valid_region_mean(value_map: torch.Tensor, mask: torch.Tensor | None, window: int) -> torch.Tensor:
    """Per-item mean (B,) of an SSIM-type map over the voxels of `mask` (B or 1, 1, *spatial) that the
    map covers: the valid region of a convolution with a `window`-wide kernel. NaN where none."""
    if mask is None:
        return value_map.flatten(1).mean(1)
    crop = (window - 1) // 2
    inside = (mask[(...,) + tuple(slice(crop, size - crop) for size in mask.shape[2:])] > 0.5).float()
    inside = inside.expand_as(value_map).flatten(1)
    return (value_map.flatten(1) * inside).sum(1) / inside.sum(1)  # 0 / 0 = NaN for an empty mask
