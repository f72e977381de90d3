"""Merging an anatomical prior's estimate of the missing bone into a diffusion sample.

The priors (:mod:`scripts.mirror` for one-sided defects, :mod:`scripts.shell` for the rest) estimate the
missing bone from the defective skull alone; the sample says where the defect is. Merging keeps the
estimate's points in the directions the sample filled and replaces the sample's points there, so the
implant's outline comes from the sample and its surface from the prior. Directions are taken from the
skull's centre, so a sample that sits a few voxels too far in or out is still recognised as covered.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["unit_directions", "merge_prior_points"]


def unit_directions(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Unit vectors from ``centre (3,)`` to ``points (N, 3)``."""
    offsets = points - centre
    return offsets / np.maximum(np.linalg.norm(offsets, axis=1, keepdims=True), 1e-9)


def merge_prior_points(
    generated: np.ndarray,
    missing: np.ndarray,
    centre: np.ndarray,
    rng: np.random.Generator,
    near_rad: float = 0.15,
    cover_rad: float = 0.08,
    min_cover: float = 0.1,
) -> tuple[np.ndarray, float]:
    """Merge a sample's implant points with a prior's estimate of the missing bone.

    ``generated (N, 3)`` and ``missing (M, 3)`` in the same coordinates, ``centre (3,)`` the skull's
    centre. Estimate points whose direction from the centre is more than ``near_rad`` (chord on the unit
    sphere, about radians) from every generated point are dropped (for the mirror: natural asymmetry
    elsewhere); generated points within ``cover_rad`` of a kept estimate point are "covered" and replaced
    by as many kept estimate points (drawn by ``rng``). Returns the merged ``(N, 3)`` points and the covered fraction; with less than
    ``min_cover`` covered, the sample is returned unchanged with fraction 0.
    """
    if len(missing) == 0:
        return generated, 0.0
    gen_dirs, miss_dirs = unit_directions(generated, centre), unit_directions(missing, centre)
    to_generated, _ = cKDTree(gen_dirs).query(miss_dirs)
    kept = to_generated <= near_rad
    if not kept.any():
        return generated, 0.0
    to_prior, _ = cKDTree(miss_dirs[kept]).query(gen_dirs)
    covered = to_prior <= cover_rad
    if covered.sum() < min_cover * len(generated):
        return generated, 0.0
    candidates = missing[kept]
    pick = rng.choice(len(candidates), int(covered.sum()), replace=len(candidates) < covered.sum())
    return np.concatenate([generated[~covered], candidates[pick]]), float(covered.mean())
