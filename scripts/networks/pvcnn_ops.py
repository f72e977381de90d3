"""PVCNN point/voxel operators (Liu et al., NeurIPS 2019) in pure PyTorch, with reference semantics.

The reference ships these as CUDA kernels; here every op is plain PyTorch so it runs anywhere,
plus CPU fast paths (numpy / ``scipy.spatial.cKDTree``) that return *identical* indices.

Layouts: coordinate-only ops (sampling, neighbour search) take points-last ``(B, N, 3)``;
feature ops take channels-first ``(B, C, N)`` like the network. All squared distances are
computed in the input dtype as ``(dx*dx + dy*dy) + dz*dz`` (the kernels' formula and order) by
one helper, so the torch and CPU paths compare bit-identical numbers.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

__all__ = [
    "furthest_point_sample",
    "ball_query",
    "group",
    "three_nn",
    "three_nn_interpolate",
    "normalize_voxel_coords",
    "avg_voxelize",
    "trilinear_devoxelize",
]

# Pairs (centre x point) handled per chunk by the brute-force torch paths; with the (pairs, 3)
# difference tensor and int64 sort keys this is about 2**21 * 24 B = 50 MB per chunk.
_CHUNK_PAIRS = 1 << 21
# "auto" uses the KD-tree on CPU from this many brute-force pairs on (measured crossover: 16k-64k).
_KDTREE_MIN_PAIRS = 1 << 15
# Extra KD-tree candidates fetched per query so that distance ties can be ordered by index.
_NN_SLACK = 8
_BACKENDS = ("auto", "torch", "kdtree")


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances of broadcastable ``(..., 3)`` tensors -> ``(...)``, kernel order."""
    d = a - b
    d = d * d
    return d[..., 0] + d[..., 1] + d[..., 2]


def _check_points(name: str, x: torch.Tensor) -> None:
    if x.dim() != 3 or x.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (B, N, 3), got {tuple(x.shape)}")


def _use_kdtree(backend: str, device: torch.device, pairs: int) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "kdtree" and device.type != "cpu":
        raise ValueError(f"backend 'kdtree' needs CPU tensors, got device {device}")
    return backend == "kdtree" or (backend == "auto" and device.type == "cpu" and pairs >= _KDTREE_MIN_PAIRS)


def _workers() -> int:
    return max(torch.get_num_threads(), 1)


# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def furthest_point_sample(xyz: torch.Tensor, num_samples: int, backend: str = "auto") -> torch.Tensor:
    """Furthest point sampling: ``xyz (B, N, 3)`` -> indices ``(B, M)`` long, ``M = num_samples``.

    Starts at index 0; every step takes the point with the largest squared distance to the
    chosen set (first occurrence on ties), distances initialised to 1e10 as in the kernel.
    The loop is inherently sequential; ``backend`` "numpy" (the "auto" choice on CPU) runs it
    with numpy, whose per-call overhead is far below torch's for these small vector ops
    (same arithmetic, same result); "torch" runs on any device.
    """
    _check_points("xyz", xyz)
    b, n, _ = xyz.shape
    if not 0 < num_samples <= n:
        raise ValueError(f"num_samples must be in [1, {n}] (number of points), got {num_samples}")
    if backend not in ("auto", "torch", "numpy"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'numpy', got {backend!r}")
    if backend == "numpy" or (backend == "auto" and xyz.device.type == "cpu"):
        return torch.from_numpy(_fps_numpy(xyz.detach().cpu().numpy(), num_samples)).to(xyz.device)
    return _fps_torch(xyz, num_samples)


def _fps_numpy(xyz: np.ndarray, m: int) -> np.ndarray:
    b, n, _ = xyz.shape
    planes = np.ascontiguousarray(xyz.transpose(0, 2, 1))  # (B, 3, N)
    dist = np.full((b, n), 1e10, dtype=xyz.dtype)
    diff, d = np.empty_like(planes), np.empty_like(dist)
    idx = np.zeros((b, m), dtype=np.int64)
    last, rows = np.zeros(b, dtype=np.int64), np.arange(b)
    for i in range(1, m):
        np.subtract(planes, planes[rows, :, last][:, :, None], out=diff)
        np.multiply(diff, diff, out=diff)
        np.add(diff[:, 0], diff[:, 1], out=d)
        np.add(d, diff[:, 2], out=d)
        np.minimum(dist, d, out=dist)
        last = dist.argmax(axis=1)  # first occurrence of the maximum
        idx[:, i] = last
    return idx


def _fps_torch(xyz: torch.Tensor, m: int) -> torch.Tensor:
    b, n, _ = xyz.shape
    dist = xyz.new_full((b, n), 1e10)
    idx = torch.zeros(b, m, dtype=torch.long, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    last = idx[:, 0]
    for i in range(1, m):
        dist = torch.minimum(dist, _sq_dist(xyz, xyz[rows, last].unsqueeze(1)))
        last = dist.argmax(dim=1)  # documented: first occurrence of the maximum
        idx[:, i] = last
    return idx


# ----------------------------------------------------------------------------- ball query


@torch.no_grad()
def ball_query(centers: torch.Tensor, points: torch.Tensor, radius: float, k: int,
               backend: str = "auto") -> torch.Tensor:
    """Ball query: ``centers (B, M, 3)``, ``points (B, N, 3)`` -> neighbour indices ``(B, M, k)``.

    Per centre: the first ``k`` point indices (ascending) with squared distance strictly below
    ``radius**2`` (float32 ``r2`` as in the kernel); remaining slots repeat the first hit; a
    centre without hits gets all zeros. ``backend``: "torch" (chunked brute force),
    "kdtree" (CPU, identical result) or "auto".
    """
    _check_points("centers", centers)
    _check_points("points", points)
    if centers.shape[0] != points.shape[0]:
        raise ValueError(f"batch sizes differ: centers {centers.shape[0]}, points {points.shape[0]}")
    if radius <= 0 or k < 1:
        raise ValueError(f"need radius > 0 and k >= 1, got radius={radius}, k={k}")
    r2 = torch.tensor(radius * radius, dtype=points.dtype)
    b, m, _ = centers.shape
    if _use_kdtree(backend, points.device, m * points.shape[1]):
        out = [_ball_query_kdtree(centers[i], points[i], radius, r2, k) for i in range(b)]
    else:
        out = [_ball_query_torch(centers[i], points[i], r2.to(points.device), k) for i in range(b)]
    return torch.stack(out)


def _fill_missing(idx: torch.Tensor, n: int) -> torch.Tensor:
    """``idx (M, k)`` with ``n`` marking empty slots -> slots padded with the first hit (or 0)."""
    first = torch.where(idx[:, :1] < n, idx[:, :1], torch.zeros_like(idx[:, :1]))
    return torch.where(idx < n, idx, first)


def _ball_query_torch(centers: torch.Tensor, points: torch.Tensor, r2: torch.Tensor, k: int) -> torch.Tensor:
    n = points.shape[0]
    kk = min(k, n)
    arange = torch.arange(n, device=points.device)
    chunk = max(1, _CHUNK_PAIRS // n)
    out = []
    for c in centers.split(chunk):
        inside = _sq_dist(c[:, None, :], points[None, :, :]) < r2
        keys = torch.where(inside, arange, n)  # hits keep their index, misses sort last
        out.append(keys.topk(kk, dim=1, largest=False, sorted=True).values)
    idx = torch.cat(out)
    if kk < k:
        idx = torch.cat([idx, idx.new_full((idx.shape[0], k - kk), n)], dim=1)
    return _fill_missing(idx, n)


def _ball_query_kdtree(centers: torch.Tensor, points: torch.Tensor, radius: float, r2: torch.Tensor,
                       k: int) -> torch.Tensor:
    m, n = centers.shape[0], points.shape[0]
    tree = cKDTree(points.double().numpy())
    # float32 squared distances are within ~1e-6 (relative) of the exact ones, so a float64
    # search with a 1e-4 margin returns a superset of the float32 hits; the float32 test below
    # then selects exactly the reference's points.
    lists = tree.query_ball_point(centers.double().numpy(), radius * (1 + 1e-4) + 1e-6,
                                  workers=_workers(), return_sorted=True)
    lens = np.fromiter(map(len, lists), dtype=np.int64, count=m)
    flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(lens.sum())))
    rows = torch.from_numpy(np.repeat(np.arange(m), lens))
    keep = _sq_dist(centers[rows], points[flat]) < r2
    flat, rows = flat[keep], rows[keep]
    counts = torch.bincount(rows, minlength=m)
    rank = torch.arange(rows.numel()) - (torch.cumsum(counts, 0) - counts)[rows]  # position within its row
    sel = rank < k
    idx = torch.full((m, k), n, dtype=torch.long)
    idx[rows[sel], rank[sel]] = flat[sel]
    return _fill_missing(idx, n)


# ----------------------------------------------------------------------------- grouping


def group(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather neighbour features: ``features (B, C, N)``, ``idx (B, M, K)`` -> ``(B, C, M, K)``."""
    if features.dim() != 3 or idx.dim() != 3 or features.shape[0] != idx.shape[0]:
        raise ValueError(f"group expects features (B, C, N) and idx (B, M, K), "
                         f"got {tuple(features.shape)} and {tuple(idx.shape)}")
    b, c, _ = features.shape
    _, m, k = idx.shape
    flat = idx.reshape(b, 1, m * k).expand(b, c, m * k)
    return torch.gather(features, 2, flat).view(b, c, m, k)


# ----------------------------------------------------------------------------- 3-NN interpolation


@torch.no_grad()
def three_nn(unknown: torch.Tensor, known: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Three nearest known points of every unknown point.

    ``unknown (B, n, 3)``, ``known (B, m, 3)`` -> ``(idx (B, n, 3) long, sq_dist (B, n, 3))``
    ordered by (squared distance, index), i.e. ties go to the lower index as in the kernel's
    strict ``<`` insertion. With ``m < 3`` the missing slots are index 0 at distance ``inf``.
    """
    _check_points("unknown", unknown)
    _check_points("known", known)
    if unknown.shape[0] != known.shape[0]:
        raise ValueError(f"batch sizes differ: unknown {unknown.shape[0]}, known {known.shape[0]}")
    n, m = unknown.shape[1], known.shape[1]
    if m == 0:
        raise ValueError("three_nn needs at least one known point")
    kd = m > 3 + _NN_SLACK and _use_kdtree(backend, known.device, n * m)
    fn = _three_nn_kdtree if kd else _three_nn_torch
    res = [fn(unknown[i], known[i]) for i in range(unknown.shape[0])]
    return torch.stack([r[0] for r in res]), torch.stack([r[1] for r in res])


def _three_nn_torch(unknown: torch.Tensor, known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = known.shape[0]
    idx = [_sq_dist(u[:, None, :], known[None, :, :]).sort(dim=1, stable=True).indices[:, :3]  # ties: lower index
           for u in unknown.split(max(1, _CHUNK_PAIRS // m))]
    return _pad_three(unknown, known, torch.cat(idx))


def _pad_three(unknown: torch.Tensor, known: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = _sq_dist(unknown[:, None, :], known[idx])
    if idx.shape[1] < 3:  # fewer than 3 known points: index 0 at infinite distance (zero weight)
        pad = 3 - idx.shape[1]
        idx = torch.cat([idx, idx.new_zeros(idx.shape[0], pad)], dim=1)
        d = torch.cat([d, d.new_full((d.shape[0], pad), float("inf"))], dim=1)
    return idx, d


def _three_nn_kdtree(unknown: torch.Tensor, known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kq = 3 + _NN_SLACK
    d64, cand = cKDTree(known.double().numpy()).query(unknown.double().numpy(), k=kq, workers=_workers())
    cand = torch.from_numpy(cand)
    cand = cand.sort(dim=1).values  # index order first, so the stable sort below breaks ties by index
    d = _sq_dist(unknown[:, None, :], known[cand])
    order = d.argsort(dim=1, stable=True)[:, :3]
    idx = cand.gather(1, order)
    # Certify: any point outside the candidate list is at float64 distance >= the last
    # candidate's; if the 3rd float32 distance is below that by more than float32 rounding
    # (~1e-6 relative), no outside point can rank in the top 3 and the result is exact.
    bound = torch.from_numpy(d64[:, -1] ** 2 * (1 - 1e-5) - 1e-12)
    unsure = ~(d.gather(1, order)[:, 2].double() < bound)
    if unsure.any():  # exact ties beyond the slack: brute force for those rows only
        idx[unsure] = _three_nn_torch(unknown[unsure], known)[0]
    return _pad_three(unknown, known, idx)


def three_nn_interpolate(unknown: torch.Tensor, known: torch.Tensor, known_feats: torch.Tensor,
                         backend: str = "auto") -> torch.Tensor:
    """Inverse-squared-distance interpolation from the 3 nearest known points.

    ``unknown (B, n, 3)``, ``known (B, m, 3)``, ``known_feats (B, C, m)`` -> ``(B, C, n)``.
    Weights ``w_i = (1/d_i) / sum_j (1/d_j)`` with squared distances clamped to
    ``[1e-10, 1e10]`` (the PVCNN kernel); differentiable w.r.t. ``known_feats`` only.
    """
    if known_feats.dim() != 3 or known_feats.shape[0] != known.shape[0] or known_feats.shape[2] != known.shape[1]:
        raise ValueError(f"known_feats must be (B, C, m) matching known {tuple(known.shape)}, "
                         f"got {tuple(known_feats.shape)}")
    idx, d = three_nn(unknown, known, backend)
    w = 1.0 / d.clamp(1e-10, 1e10)
    w = (w / w.sum(dim=2, keepdim=True)).to(known_feats.dtype)
    b, c, _ = known_feats.shape
    out = None
    for j in range(3):  # three (B, C, n) gathers + multiply-adds: ~2.5x faster on CPU than one (B, C, n, 3) gather
        nbr = torch.gather(known_feats, 2, idx[:, :, j].unsqueeze(1).expand(b, c, idx.shape[1]))
        wj = w[:, None, :, j]
        out = nbr * wj if out is None else torch.addcmul(out, nbr, wj)
    return out


# ----------------------------------------------------------------------------- voxelization


@torch.no_grad()
def normalize_voxel_coords(coords: torch.Tensor, resolution: int, normalize: bool = True,
                           eps: float = 0.0) -> torch.Tensor:
    """PVCNN voxel coordinates: ``coords (B, 3, N)`` -> continuous ``(B, 3, N)`` in ``[0, R-1]``.

    Centre on the mean; with ``normalize`` divide by ``2 * max norm + eps`` and add 0.5 (unit
    cube), else map ``[-1, 1]`` to ``[0, 1]``; scale by ``R`` and clamp to ``[0, R-1]``.
    """
    if coords.dim() != 3 or coords.shape[1] != 3:
        raise ValueError(f"coords must have shape (B, 3, N), got {tuple(coords.shape)}")
    c = coords - coords.mean(dim=2, keepdim=True)
    if normalize:
        c = c / (c.norm(dim=1, keepdim=True).amax(dim=2, keepdim=True) * 2.0 + eps) + 0.5
    else:
        c = (c + 1.0) / 2.0
    return torch.clamp(c * resolution, 0, resolution - 1)


def avg_voxelize(features: torch.Tensor, coords: torch.Tensor, resolution: int, normalize: bool = True,
                 eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Average point features per voxel.

    ``features (B, C, N)``, ``coords (B, 3, N)`` -> ``(grid (B, C, R, R, R), norm_coords (B, 3, N))``
    where ``norm_coords`` are the continuous voxel coordinates (see ``normalize_voxel_coords``)
    and each point falls in voxel ``round(norm_coords)`` (half to even, like ``torch.round``).
    Empty voxels are 0. Differentiable w.r.t. ``features``; coordinates carry no gradient.
    """
    b, c, n = features.shape
    if coords.shape != (b, 3, n):
        raise ValueError(f"coords must have shape {(b, 3, n)} to match features, got {tuple(coords.shape)}")
    r = int(resolution)
    norm = normalize_voxel_coords(coords, r, normalize, eps)
    vox = torch.round(norm).long()
    flat = ((vox[:, 0] * r + vox[:, 1]) * r + vox[:, 2]) + torch.arange(b, device=vox.device)[:, None] * r**3
    flat = flat.reshape(-1)
    # Points-major layout so each index_add row is a contiguous C-vector (much faster on CPU).
    src = features.transpose(1, 2).reshape(b * n, c)
    sums = features.new_zeros(b * r**3, c).index_add(0, flat, src)
    counts = torch.bincount(flat, minlength=b * r**3).clamp_(min=1).to(features.dtype)
    grid = (sums / counts[:, None]).view(b, r, r, r, c).permute(0, 4, 1, 2, 3).contiguous()
    return grid, norm


def trilinear_devoxelize(grid: torch.Tensor, norm_coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """Trilinear interpolation of ``grid (B, C, R, R, R)`` at ``norm_coords (B, 3, N)`` -> ``(B, C, N)``.

    ``norm_coords`` are continuous voxel coordinates in ``[0, R-1]`` (axis 0 indexes the first
    spatial dim). Same weights as the PVCNN kernel, computed by ``grid_sample`` with
    ``align_corners=True``; gradient flows to ``grid`` only.
    """
    r = int(resolution)
    if r < 2 or grid.dim() != 5 or grid.shape[2:] != (r, r, r):
        raise ValueError(f"grid must be (B, C, {r}, {r}, {r}) with resolution >= 2, got {tuple(grid.shape)}")
    b, _, n = norm_coords.shape
    # grid_sample's last grid axis is (W, H, D) = (coord 2, coord 1, coord 0), normalised to [-1, 1]
    g = norm_coords.detach().flip(1).transpose(1, 2) * (2.0 / (r - 1)) - 1.0
    out = F.grid_sample(grid, g.reshape(b, 1, 1, n, 3).to(grid.dtype), mode="bilinear",
                        padding_mode="border", align_corners=True)
    return out.view(b, grid.shape[1], n)
