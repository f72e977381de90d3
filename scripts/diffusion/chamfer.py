"""Chamfer distance between batched point clouds (pytorch3d is not a dependency)."""

from __future__ import annotations

import torch


def chamfer_distance(
    a: torch.Tensor, b: torch.Tensor, squared: bool = True, max_elements: int = 2**24
) -> torch.Tensor:
    """Symmetric Chamfer distance: mean_a min_b d + mean_b min_a d, per cloud.

    a: (B, N, 3), b: (B, M, 3) -> (B,). ``squared=True`` uses squared Euclidean distances (the
    PVD convention); False gives distances in the clouds' units. The distance matrix is built
    in chunks of rows of ``a`` holding at most ``max_elements`` entries, so memory stays bounded.
    """
    if a.ndim != 3 or b.ndim != 3 or a.shape[2] != 3 or b.shape[2] != 3 or a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have shapes (B, N, 3) and (B, M, 3), got {tuple(a.shape)}, {tuple(b.shape)}")
    if a.shape[1] == 0 or b.shape[1] == 0:
        raise ValueError(f"empty point cloud: a has {a.shape[1]} points, b has {b.shape[1]}")
    bsz, m = b.shape[0], b.shape[1]
    chunk = max(1, max_elements // (bsz * m))
    a_to_b = []
    b_to_a = torch.full((bsz, m), float("inf"), dtype=a.dtype, device=a.device)
    for start in range(0, a.shape[1], chunk):
        d = torch.cdist(a[:, start : start + chunk], b)  # (B, chunk, M)
        if squared:
            d = d.square()
        a_to_b.append(d.min(dim=2).values)
        b_to_a = torch.minimum(b_to_a, d.min(dim=1).values)
    return torch.cat(a_to_b, dim=1).mean(dim=1) + b_to_a.mean(dim=1)
