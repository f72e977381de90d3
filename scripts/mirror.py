"""The left-right mirror image of a defective skull, for one-sided defects.

A skull is nearly symmetric about its mid-sagittal plane, so the mirror image of the intact side shows
the bone a one-sided defect removed (mirroring is how many implants are designed by hand). Here the
defective skull is reflected across the left-right axis and aligned to itself by rigid ICP on its
surface points (Open3D), which absorbs head tilt and an off-centre midline; :func:`mirrored_skull`
resamples the mask with that transform. :class:`scripts.priors.SkullRays` reads the missing bone off it
and anchors it to the bone around the hole. A defect that crosses the midline has no intact counterpart
for its middle part: the mirror covers little of it, and the smooth-shell prior takes over.
"""

from __future__ import annotations

import numpy as np
import open3d as o3d
from scipy import ndimage

from scripts.data.points import mask_to_surface_points, normalization_params

__all__ = ["mirror_transform", "mirrored_skull"]


def mirror_transform(
    defective: np.ndarray, axis: int = 0, *, num_surface: int, icp_distance: float, seed: int = 0
) -> np.ndarray:
    """The 4x4 voxel-to-voxel transform that maps the skull onto its aligned mirror image.

    ``defective (X, Y, Z)`` bool on an isotropic grid. ``num_surface`` Poisson-disk points on its surface
    are reflected across ``axis`` about their mean and aligned to the originals by point-to-point ICP with
    correspondences within ``icp_distance``, in the units the denoiser sees (the skull's longest extent / 6,
    about 19 voxels on the 128^3 synthetic grid), so it does not depend on the grid. The two numbers are
    :class:`scripts.priors.AnatomicalPriors`' ``mirror_points`` and ``icp_distance`` (their values and why
    are there; :meth:`~scripts.priors.AnatomicalPriors.mirror_transform` passes them).
    """
    points = mask_to_surface_points(defective, num_surface, seed=seed)
    unit = float(normalization_params(points)[1])
    reflection = np.eye(4)
    reflection[axis, axis], reflection[axis, 3] = -1.0, 2.0 * points[:, axis].mean()
    source, target = o3d.geometry.PointCloud(), o3d.geometry.PointCloud()
    source.points = o3d.utility.Vector3dVector(points @ reflection[:3, :3].T + reflection[:3, 3])
    target.points = o3d.utility.Vector3dVector(points)
    fit = o3d.pipelines.registration.registration_icp(
        source, target, icp_distance * unit, np.eye(4),
        o3d.pipelines.registration.TransformationEstimationPointToPoint(),
        o3d.pipelines.registration.ICPConvergenceCriteria(max_iteration=50),
    )
    return fit.transformation @ reflection


def mirrored_skull(defective: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """``defective (X, Y, Z)`` bool resampled (nearest voxel) through the 4x4 voxel ``transform`` of
    :func:`mirror_transform`: the aligned mirror image on the same grid."""
    inverse = np.linalg.inv(transform)  # scipy pulls each output voxel from input[inverse @ voxel]
    return ndimage.affine_transform(defective.astype(np.uint8), inverse[:3, :3], inverse[:3, 3], order=0) > 0
