"""Pairing of noise points with target points for training (minibatch optimal transport).

With the paper's independent pairing, the noise point that becomes a given target point is random,
so the best x0 (or epsilon) prediction for a noisy point is the *mean* of many targets and the
generated cloud contracts ("clumps"). Optimal-transport pairing (Tong et al. 2023, "Improving and
generalizing flow-based generative models with minibatch optimal transport"; Pooladian et al. 2023)
permutes the noise points of each sample so that noise point j is the one closest, under the
least-total-squared-distance assignment, to target point j. The per-point target then becomes
(nearly) a deterministic function of the noisy cloud, which removes that irreducible loss.

Exact assignment is SciPy's Hungarian solver (``linear_sum_assignment``), O(n^3): 70 ms for 384
points on one core, 71 s for 3,072. Larger clouds are therefore split into equal-size cells by the
same recursive median split of both clouds along the target cell's principal axis, and the cells
are assigned exactly, pair by pair (an approximation no library offers for equal-size point
sets). Measured on one core: 384 points in cells of <= 128: 8 ms, total squared distance 0.1 %
above the exact optimum (random pairing: 14 % above); 3,072 points: 74 ms, 1.5 % above.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

PAIRINGS = ("independent", "ot")


def _exact_assignment(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """perm (n,) with source[perm[j]] assigned to target[j]; both (n, 3)."""
    rows, cols = linear_sum_assignment(cdist(target, source, "sqeuclidean"))
    perm = np.empty(len(target), dtype=np.int64)
    perm[rows] = cols
    return perm


def _split(points: np.ndarray, index: np.ndarray, axis: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """index split into the ``half`` points lowest along axis and the rest."""
    order = np.argsort(points[index] @ axis, kind="stable")
    return index[order[:half]], index[order[half:]]


def ot_assignment(source: np.ndarray, target: np.ndarray, exact_limit: int = 128) -> np.ndarray:
    """Permutation perm (n,) so that ``source[perm]`` is paired point-for-point with target.

    source, target: (n, 3) float arrays of the same size. Exact (minimum total squared distance)
    when n <= exact_limit, otherwise the cell-wise approximation of the module docstring.
    """
    if source.shape != target.shape or source.ndim != 2:
        raise ValueError(f"source and target must both be (n, d), got {source.shape} and {target.shape}")
    perm = np.empty(len(target), dtype=np.int64)
    stack = [(np.arange(len(source)), np.arange(len(target)))]
    while stack:
        src, tgt = stack.pop()
        if len(tgt) <= exact_limit:
            perm[tgt] = src[_exact_assignment(source[src], target[tgt])]
            continue
        centred = target[tgt] - target[tgt].mean(axis=0)
        axis = np.linalg.svd(centred, full_matrices=False)[2][0]  # principal axis of the target cell
        half = len(tgt) // 2
        src_lo, src_hi = _split(source, src, axis, half)
        tgt_lo, tgt_hi = _split(target, tgt, axis, half)
        stack += [(src_lo, tgt_lo), (src_hi, tgt_hi)]
    return perm


def pair_noise(noise: torch.Tensor, target: torch.Tensor, pairing: str = "ot", exact_limit: int = 128) -> torch.Tensor:
    """Reorder the noise points of each sample to pair them with the target points.

    noise, target: (B, 3, Nt). Returns noise (B, 3, Nt) with the same points per sample, reordered
    ("ot") or unchanged ("independent", the paper). Minimising the total squared distance is
    maximising the sum of dot products, so the assignment ignores the target's position and scale.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if noise.shape != target.shape or noise.ndim != 3:
        raise ValueError(f"noise and target must both be (B, 3, Nt), got {tuple(noise.shape)} and {tuple(target.shape)}")
    if pairing == "independent":
        return noise
    src = noise.detach().transpose(1, 2).cpu().double().numpy()
    tgt = target.detach().transpose(1, 2).cpu().double().numpy()
    perms = np.stack([ot_assignment(s, t, exact_limit) for s, t in zip(src, tgt)])
    index = torch.as_tensor(perms, device=noise.device)[:, None, :].expand_as(noise)
    return torch.gather(noise, 2, index)
