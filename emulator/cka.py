"""Linear CKA between block outputs, and contiguous clustering by it: the math behind the ``share`` compressor
(CRaSh, Zhang et al., EMNLP 2023; CKA after Kornblith et al. 2019)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from emulator.errors import CompressError


def _centered_gram(x: torch.Tensor) -> torch.Tensor:
    """x: (n, d) -> H X X^T H: (n, n), the centred linear kernel."""
    x = x.double() - x.double().mean(0, keepdim=True)  # (n, d)
    return x @ x.T  # (n, n)


def cka_matrix(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Linear CKA between every pair of (n, d_i) feature sets: ``<K_i, K_j>_F / (|K_i| |K_j|)``, K the centred Gram
    (Kornblith et al. 2019). 1 on the diagonal; invariant to orthogonal maps and isotropic scaling. Returns (L, L)."""
    n = features[0].shape[0]
    if any(f.ndim != 2 or f.shape[0] != n for f in features):
        shapes = [tuple(f.shape) for f in features]
        raise ValueError(f"CKA needs (n, d) feature sets over the same n tokens, got {shapes}")
    grams = torch.stack([_centered_gram(f).flatten() for f in features])  # (L, n*n)
    grams = grams / grams.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (grams @ grams.T).float()  # (L, L)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of x: (n, d1) and y: (n, d2)."""
    return float(cka_matrix([x, y])[0, 1])


def contiguous_clusters(sim: torch.Tensor, runs: Sequence[int], k: int) -> list[tuple[list[int], int]]:
    """Split items ``0..L-1`` into ``k`` contiguous clusters, none crossing from one run to another (``runs[i]``
    is item i's run: the middle between two adapter blocks), minimising ``sum_i (1 - sim[i, medoid])``: a 1-D
    k-medoids solved exactly by dynamic programming. Returns ``(members, medoid)`` per cluster, in order."""
    L = sim.shape[0]
    n_runs = len(set(runs))
    if not n_runs <= k <= L:
        raise CompressError(f"{{clusters}} must be between {n_runs} (one per middle run) and the {L} middle blocks, "
                            f"got {k}")
    dist = 1.0 - sim.double()  # (L, L)
    prefix = torch.cat([torch.zeros(1, L, dtype=dist.dtype), dist.cumsum(0)])  # (L+1, L): prefix[e, r] = sum_{i<e}
    cost = [[math.inf] * (L + 1) for _ in range(L)]  # cost[s][e]: cluster s..e-1
    medoid = [[0] * (L + 1) for _ in range(L)]
    for s in range(L):
        for e in range(s + 1, L + 1):
            if runs[e - 1] != runs[s]:
                break
            within = prefix[e, s:e] - prefix[s, s:e]  # (e-s,): total distance to each candidate medoid
            r = int(within.argmin())
            cost[s][e], medoid[s][e] = float(within[r]), s + r
    # best[c][e]: items 0..e-1 in c clusters; back[c][e]: where the last cluster starts
    best = [[math.inf] * (L + 1) for _ in range(k + 1)]
    back = [[0] * (L + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for c in range(1, k + 1):
        for e in range(1, L + 1):
            for s in range(e):
                total = best[c - 1][s] + cost[s][e]
                if total < best[c][e]:
                    best[c][e], back[c][e] = total, s
    clusters, e = [], L
    for c in range(k, 0, -1):
        s = back[c][e]
        clusters.append((list(range(s, e)), medoid[s][e]))
        e = s
    return clusters[::-1]
