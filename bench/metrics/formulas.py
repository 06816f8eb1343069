"""The metric formulas on features, probabilities and embeddings, free of any network: each is
the equation of its paper, and each is tested against a value worked out by hand. At the end, the
bootstrap statistics (precision, recall, Inception Score) that several feature spaces share."""

from __future__ import annotations

import numpy as np
import torch
from cleanfid.fid import frechet_distance, kernel_distance

from bench.metrics.base import Statistic

K = 3  # nearest neighbours of the precision/recall manifolds (Kynkäänniemi et al. 2019)


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (clean-fid's formula,
    Heusel et al. 2017: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)))."""
    return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))


def fid_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    return float(frechet_distance(mu_a, sigma_a, mu_b, sigma_b))


class FrechetToReference:
    """FID of feature sets against fixed reference statistics, for the many bootstrap resamples.

    The same quantity as clean-fid's ``frechet_distance`` (tested equal), computed as
    Tr (S_g S_r)^(1/2) = sum of sqrt(eigenvalues of R S_g R) with R = S_r^(1/2) symmetric: R is
    computed once per reference and each resample needs one symmetric eigenvalue problem instead
    of a general matrix square root (10x faster at 2048 dimensions)."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray) -> None:
        self.mu = np.asarray(mu, dtype=np.float64)
        sigma = np.asarray(sigma, dtype=np.float64)
        w, v = np.linalg.eigh(sigma)
        self.root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        self.trace = float(np.trace(sigma))

    def __call__(self, feats: np.ndarray) -> float:
        mu = feats.mean(0)
        s = np.atleast_2d(np.cov(feats, rowvar=False))
        ev = np.linalg.eigvalsh(self.root @ s @ self.root)
        return float(((mu - self.mu) ** 2).sum() + np.trace(s) + self.trace - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def kid_from_features(a: np.ndarray, b: np.ndarray, seed: int = 0, num_subsets: int = 100) -> float:
    """Unbiased cubic-polynomial-kernel MMD^2 (KID, Binkowski et al. 2018) by clean-fid, averaged
    over subsets of at most 1000 points; its subset draws seeded."""
    state = np.random.get_state()  # clean-fid draws subsets from numpy's global generator
    np.random.seed(seed)
    try:
        return float(kernel_distance(a, b, num_subsets=num_subsets))
    finally:
        np.random.set_state(state)


class KernelToReference:
    """KID of resamples ``gen[idx]`` of one generated set against a fixed reference set, for the
    many bootstrap resamples: the same number as :func:`kid_from_features` on ``gen[idx]`` (the same
    subset draws from the same seed; tested equal to clean-fid to rounding), without a matrix
    product per resample.

    clean-fid averages, over subsets, the unbiased MMD^2 of ``m`` reference rows and ``m``
    generated rows. When the generated set is no larger than the reference and 1000 (the digits
    case: 300 samples against 1297), its ``m`` rows are all of the resample, permuted; so with
    ``w`` the count of each sample in the resample, the generated term is ``w' K_gg w`` minus its
    diagonal and the cross term sums ``K_rg w`` over the subset's reference rows, while the
    reference rows a seed draws, and their term, are the same for every resample. The kernel
    matrices are kept while both sets have at most ``max_points`` rows; otherwise, and when
    clean-fid would subsample the generated set, the call goes to clean-fid itself."""

    def __init__(self, gen: np.ndarray, ref: np.ndarray, num_subsets: int = 100, max_points: int = 5000) -> None:
        self.gen, self.ref, self.num_subsets = gen, ref, num_subsets
        self.fast = len(gen) <= max_points and len(ref) <= max_points
        self._draws: dict[tuple[int, int], list[tuple[np.ndarray, float]]] = {}
        if self.fast:
            d = gen.shape[1]
            self.k_rr = (ref @ ref.T / d + 1) ** 3
            self.k_gg = (gen @ gen.T / d + 1) ** 3
            self.k_rg = (ref @ gen.T / d + 1) ** 3

    def _reference_draws(self, seed: int, n: int) -> list[tuple[np.ndarray, float]]:
        """Per subset: the reference rows clean-fid draws after ``np.random.seed(seed)`` (its draws
        of generated rows consumed in turn), and their off-diagonal kernel sum."""
        if (seed, n) not in self._draws:
            rs = np.random.RandomState(seed)  # the legacy generator behind np.random.seed/choice
            out = []
            for _ in range(self.num_subsets):
                xi = rs.choice(len(self.ref), n, replace=False)
                rs.choice(n, n, replace=False)  # the permutation of generated rows: order does not matter
                k = self.k_rr[np.ix_(xi, xi)]
                out.append((xi, float(k.sum() - np.trace(k))))
            self._draws[(seed, n)] = out
        return self._draws[(seed, n)]

    def __call__(self, idx: np.ndarray, seed: int = 0) -> float:
        idx = np.asarray(idx)
        n = len(idx)
        if not self.fast or n > min(len(self.ref), 1000) or n < 2:
            return kid_from_features(self.gen[idx], self.ref, seed, self.num_subsets)
        w = np.bincount(idx, minlength=len(self.gen)).astype(np.float64)
        yy = float(w @ self.k_gg @ w - w @ np.diag(self.k_gg))
        v = self.k_rg @ w
        t = sum((xx + yy) / (n - 1) - 2 * float(v[xi].sum()) / n for xi, xx in self._reference_draws(seed, n))
        return float(t / self.num_subsets / n)


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(feats: np.ndarray, k: int = 3, chunk: int = 1024) -> np.ndarray:
    """Distance of each point to its k-th nearest neighbour in the same set (itself excluded):
    the radius of its hypersphere in Kynkäänniemi et al. 2019's manifold estimate."""
    x = torch.as_tensor(feats, dtype=torch.float64)
    if len(x) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got {len(x)}")
    out = []
    for lo in range(0, len(x), chunk):
        d = _pairwise(x[lo : lo + chunk], x)
        out.append(torch.kthvalue(d, k + 1, dim=1).values)  # k+1: the point itself is at distance 0
    return torch.cat(out).numpy()


def manifold_hits(manifold: np.ndarray, radii: np.ndarray, query: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For each query point: does it fall inside the hypersphere of any manifold point?"""
    m = torch.as_tensor(manifold, dtype=torch.float64)
    r = torch.as_tensor(radii, dtype=torch.float64)
    q = torch.as_tensor(query, dtype=torch.float64)
    hits = []
    for lo in range(0, len(q), chunk):
        hits.append((_pairwise(q[lo : lo + chunk], m) <= r[None, :]).any(1))
    return torch.cat(hits).numpy()


def precision_recall(real: np.ndarray, gen: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, k-NN manifolds): precision is the
    fraction of generated points inside the real manifold, recall the fraction of real points
    inside the generated one."""
    precision = manifold_hits(real, knn_radii(real, k), gen).mean()
    recall = manifold_hits(gen, knn_radii(gen, k), real).mean()
    return float(precision), float(recall)


def inception_score(probs: np.ndarray, eps: float = 1e-12) -> float:
    """exp(E_x KL(p(y|x) || p(y))) with p(y) the mean of p(y|x) over the set (Salimans et al. 2016),
    on one split (the bootstrap gives the uncertainty that the 10-split std used to)."""
    p = np.asarray(probs, dtype=np.float64)
    py = p.mean(0, keepdims=True)
    kl = (p * (np.log(p + eps) - np.log(py + eps))).sum(1)
    return float(np.exp(kl.mean()))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of paired embeddings."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def clip_score_from_embeddings(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """CLIP score of each (image, prompt) pair: 100 * max(cos, 0) (Hessel et al. 2021, with w = 100
    as torchmetrics and MLPerf report it)."""
    return 100.0 * np.maximum(cosine(image_emb, text_emb), 0.0)


def pickscore_from_embeddings(image_emb: np.ndarray, text_emb: np.ndarray, logit_scale: float) -> np.ndarray:
    """PickScore of each pair: exp(logit_scale) * cos (Kirstain et al. 2023), logit_scale being the
    model's learned log temperature."""
    return float(np.exp(logit_scale)) * cosine(image_emb, text_emb)


def rbf_mean(x: np.ndarray, y: np.ndarray, sigma: float, chunk: int = 2048) -> float:
    """Mean over all pairs of the Gaussian RBF kernel exp(-|a-b|^2 / (2 sigma^2))."""
    a = torch.as_tensor(x, dtype=torch.float64)
    b = torch.as_tensor(y, dtype=torch.float64)
    gamma = 1.0 / (2 * sigma**2)
    total = 0.0
    for lo in range(0, len(a), chunk):
        total += float(torch.exp(-gamma * _pairwise(a[lo : lo + chunk], b) ** 2).sum())
    return total / (len(a) * len(b))


def cmmd_from_embeddings(x: np.ndarray, y: np.ndarray, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """CMMD (Jayasumana et al. 2024): scale * MMD^2 with the Gaussian RBF kernel
    k(a, b) = exp(-|a-b|^2 / (2 sigma^2)) between two sets of (L2-normalised) CLIP embeddings, the
    V-statistic (all pairs, diagonals included) as the paper's reference code computes it."""
    return scale * (rbf_mean(x, x, sigma) + rbf_mean(y, y, sigma) - 2 * rbf_mean(x, y, sigma))


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio (dB) of a set of images against their references, the squared
    error pooled over all pixels of the set (torchmetrics' default); inf when identical."""
    mse = float(((x.double() - y.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


# --- statistics shared by the feature spaces (digits, inception) ---------------------------------


def precision_statistic(gen: np.ndarray, ref: np.ndarray, k: int = K) -> Statistic:
    """Precision as a mean over generated samples of 'inside the real manifold' (fixed by the
    reference set), so its bootstrap is over samples."""
    hit = manifold_hits(ref, knn_radii(ref, k), gen).astype(np.float64)
    return Statistic(lambda idx: hit[idx].mean(), len(gen), (0.0, 1.0))


def recall_statistic(gen: np.ndarray, ref: np.ndarray, k: int = K) -> Statistic:
    """Recall: the fraction of real points inside the manifold of the generated set. A resample's
    manifold is built from its distinct samples (a repeated point would shrink k-NN radii to 0);
    a resample with k or fewer distinct samples has no manifold and is left out (NaN)."""
    knn_radii(gen, k)  # the full set must have a manifold: a clear error otherwise

    def stat(idx: np.ndarray) -> float:
        g = gen[np.unique(idx)]
        if len(g) <= k:
            return float("nan")
        return float(manifold_hits(g, knn_radii(g, k), ref).mean())

    return Statistic(stat, len(gen), (0.0, 1.0))


def inception_score_statistic(probs: np.ndarray) -> Statistic:
    return Statistic(lambda idx: inception_score(probs[idx]), len(probs), (1.0, float(probs.shape[1])))
