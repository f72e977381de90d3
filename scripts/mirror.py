"""A left-right mirror prior for one-sided defects.

A skull is nearly symmetric about its mid-sagittal plane, so the mirror image of the intact side shows
the bone a one-sided defect removed (mirroring is how many implants are designed by hand). Here the
defective skull's surface points are reflected across the left-right axis and aligned to the skull
with rigid ICP (Open3D), which absorbs head tilt and an off-centre midline; the mirrored points that
no point of the skull explains are the mirror's estimate of the missing bone.

The generator merges that estimate into a diffusion sample (:func:`scripts.priors.merge_prior_points`).
A defect that crosses the midline has no intact counterpart for its middle part: the mirror covers
little of it, and the generator takes the smooth-shell estimate (:mod:`scripts.shell`) instead.
"""

from __future__ import annotations

import numpy as np
import open3d as o3d
from scipy.spatial import cKDTree

from scripts.data.points import mask_to_surface_points, normalization_params

__all__ = ["left_right_axis", "mirrored_missing_points"]


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
