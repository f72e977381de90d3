"""A left-right mirror prior for one-sided defects.

A skull is nearly symmetric about its mid-sagittal plane, so the mirror image of the intact side shows
the bone a one-sided defect removed (mirroring is how many implants are designed by hand). Here the
defective skull's surface points are reflected across the left-right axis and aligned to the skull
with rigid ICP (Open3D), which absorbs head tilt and an off-centre midline; the mirrored points that
no point of the skull explains are the mirror's estimate of the missing bone.

:func:`mirror_guided_points` merges that estimate with the points a diffusion sample generated: the
sample says where the defect is (mirrored points in other directions, from natural asymmetry, are
dropped), and the sample's points in the directions the mirror covers are replaced by mirrored
points. Directions are taken from the skull's centre, so a sample that sits a few voxels too far in
or out is still recognised as covered. A defect that crosses the midline has no intact counterpart
for its middle part, which keeps the sample's points there.
"""

from __future__ import annotations

import numpy as np
import open3d as o3d
from scipy.spatial import cKDTree

from scripts.data.points import mask_to_surface_points, normalization_params

__all__ = ["left_right_axis", "mirrored_missing_points", "mirror_guided_points"]


def left_right_axis(affine: np.ndarray | None) -> int:
    """The array axis of a volume that runs closest to the patient's left-right (world x) direction,
    from its 4x4 voxel-to-world ``affine`` (RAS or LPS alike); axis 0 without one."""
    if affine is None:
        return 0
    return int(np.argmax(np.abs(np.asarray(affine, dtype=float)[0, :3])))


def mirrored_missing_points(
    defective: np.ndarray,
    axis: int = 0,
    num_surface: int = 6000,
    unexplained: float = 0.2,
    icp_distance: float = 0.3,
    seed: int = 0,
) -> np.ndarray:
    """The mirror image's estimate of the missing bone: ``(M, 3)`` voxel coords (M may be 0).

    ``defective (X, Y, Z)`` bool on an isotropic grid. ``num_surface`` Poisson-disk points on its surface
    (about 3 voxels apart on a 128^3 skull) are reflected across ``axis`` about their mean, aligned to
    the originals by point-to-point ICP (correspondences within ``icp_distance``), and kept where no
    original point lies within ``unexplained``. Distances are in the units the denoiser sees (the
    skull's longest extent / 6, about 19 voxels on the 128^3 synthetic grid), so they do not depend on
    the grid: 0.2 is about 4 voxels of 1.6 mm there.
    """
    points = mask_to_surface_points(defective, num_surface, seed=seed)
    unit = float(normalization_params(points)[1])
    mirrored = points.copy()
    mirrored[:, axis] = 2.0 * points[:, axis].mean() - points[:, axis]
    source, target = o3d.geometry.PointCloud(), o3d.geometry.PointCloud()
    source.points = o3d.utility.Vector3dVector(mirrored)
    target.points = o3d.utility.Vector3dVector(points)
    fit = o3d.pipelines.registration.registration_icp(
        source, target, icp_distance * unit, np.eye(4),
        o3d.pipelines.registration.TransformationEstimationPointToPoint(),
        o3d.pipelines.registration.ICPConvergenceCriteria(max_iteration=50),
    )
    aligned = mirrored @ fit.transformation[:3, :3].T + fit.transformation[:3, 3]
    distance, _ = cKDTree(points).query(aligned)
    return aligned[distance > unexplained * unit]


def _directions(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Unit vectors from ``centre (3,)`` to ``points (N, 3)``."""
    offsets = points - centre
    return offsets / np.maximum(np.linalg.norm(offsets, axis=1, keepdims=True), 1e-9)


def mirror_guided_points(
    generated: np.ndarray,
    missing: np.ndarray,
    centre: np.ndarray,
    rng: np.random.Generator,
    near_rad: float = 0.15,
    cover_rad: float = 0.08,
    min_cover: float = 0.1,
) -> tuple[np.ndarray, float]:
    """Merge a sample's implant points with the mirror's missing-bone points.

    ``generated (N, 3)`` and ``missing (M, 3)`` in the same coordinates, ``centre (3,)`` the skull's
    centre. Mirror points whose direction from the centre is more than ``near_rad`` (chord on the unit
    sphere, about radians) from every generated point are dropped; generated points within
    ``cover_rad`` of a kept mirror point are "covered" and replaced by as many kept mirror points
    (drawn by ``rng``). Returns the merged ``(N, 3)`` points and the covered fraction; with less than
    ``min_cover`` covered, the sample is returned unchanged with fraction 0.
    """
    if len(missing) == 0:
        return generated, 0.0
    gen_dirs, miss_dirs = _directions(generated, centre), _directions(missing, centre)
    to_generated, _ = cKDTree(gen_dirs).query(miss_dirs)
    kept = to_generated <= near_rad
    if not kept.any():
        return generated, 0.0
    to_mirror, _ = cKDTree(miss_dirs[kept]).query(gen_dirs)
    covered = to_mirror <= cover_rad
    if covered.sum() < min_cover * len(generated):
        return generated, 0.0
    candidates = missing[kept]
    pick = rng.choice(len(candidates), int(covered.sum()), replace=len(candidates) < covered.sum())
    return np.concatenate([generated[~covered], candidates[pick]]), float(covered.mean())
