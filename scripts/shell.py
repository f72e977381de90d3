"""A smooth-shell prior for defects the mirror cannot fill (those across the midline).

Seen from its centre, the cranial vault is a shell: along a direction u the bone spans the radii
[r_out(u) - thickness(u), r_out(u)], and both change slowly with u. So the bone around a hole predicts
the bone that is missing in it (classical cranioplasty planning interpolates the vault the same way).
:class:`ShellPrior` casts rays from the skull's centre, measures r_out and the thickness on the rays that
meet bone around the hole the sample filled, interpolates both into the hole with thin-plate splines
over unit directions (scipy's ``RBFInterpolator``), and places points on the outer and inner surfaces.
The generator merges them into the sample like the mirror's points (:func:`scripts.priors.merge_prior_points`).

The synthetic skulls are star-shaped around their centre by construction (scripts/data/synthetic.py),
which is where this prior is at its best; real vaults are close to it, the face and skull base are not,
which is why only the holes the sample fills are interpolated.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.interpolate import RBFInterpolator
from scipy.spatial import cKDTree

from scripts.priors import unit_directions

__all__ = ["sphere_directions", "radial_bone", "ShellPrior"]


def sphere_directions(n: int) -> np.ndarray:
    """``(n, 3)`` unit vectors spread evenly over the sphere (a Fibonacci lattice: written here because
    neither scipy nor open3d offers evenly spread directions without a mesh)."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    azimuth = np.pi * (1.0 + 5.0**0.5) * i
    ring = np.sqrt(1.0 - z * z)
    return np.stack([ring * np.cos(azimuth), ring * np.sin(azimuth), z], axis=1)


def radial_bone(mask: np.ndarray, centre: np.ndarray, directions: np.ndarray, step: float = 0.5):
    """Where rays from ``centre (3,)`` along ``directions (M, 3)`` meet the bone of ``mask (X, Y, Z)``.

    Returns ``hit (M,)`` bool (the ray meets bone), ``outer (M,)`` and ``inner (M,)`` the radii where the
    outermost run of bone ends and starts (voxels). The mask is sampled every ``step`` at the nearest voxel,
    and each boundary is put halfway between its last bone and first empty sample: the mask's surface
    (the marching-cubes level 0.5 the training points are drawn on) lies between them.
    """
    radii = np.arange(0.0, 0.5 * float(np.linalg.norm(mask.shape)) + 2.0, step)
    coords = centre[:, None, None] + directions.T[:, :, None] * radii  # (3, M, R)
    bone = ndimage.map_coordinates(mask.astype(np.uint8), coords.reshape(3, -1), order=0, mode="constant")
    bone = bone.reshape(len(directions), len(radii)) > 0
    hit = bone.any(axis=1)
    last = len(radii) - 1 - np.argmax(bone[:, ::-1], axis=1)
    gap = ~bone & (np.arange(len(radii)) < last[:, None])  # empty samples inside the last bone sample
    last_gap = len(radii) - 1 - np.argmax(gap[:, ::-1], axis=1)
    first = np.where(gap.any(axis=1), last_gap + 1, np.argmax(bone, axis=1))
    return hit, radii[last] + 0.5 * step, radii[first] - 0.5 * step


class ShellPrior:
    """The smooth-shell estimate of a defective skull's missing bone.

    Args:
        defective: ``(X, Y, Z)`` bool mask on an isotropic grid.
        centre: ``(3,)`` the skull's centre, voxel coords (rays start there).
        num_directions: rays cast (20,000: about 1.4 degrees apart).
        near_rad: hole directions farther than this (chord on the unit sphere, about radians) from every
            sampled implant point are not the defect (face, skull base, orbits) and are left open.
        context_rad: rays that meet bone within this angle of the hole carry the fit.
        rim_rad: rays this close to the hole graze its cut edge, so they give the outer radius but not
            the thickness.
        smoothing: the thin-plate spline's smoothing (voxel-quantised radii are noisy by about half a voxel).
        max_context: context rays used per fit (a random subset; the spline's solve is cubic in it).
        seed: seeds that subset and the area-weighted thinning of the surface points.
    """

    def __init__(self, defective: np.ndarray, centre: np.ndarray, num_directions: int = 20000,
                 near_rad: float = 0.15, context_rad: float = 0.3, rim_rad: float = 0.05,
                 smoothing: float = 3.0, max_context: int = 1500, seed: int = 0) -> None:
        self.centre = np.asarray(centre, dtype=float)
        self.directions = sphere_directions(num_directions)
        self.hit, self.outer, self.inner = radial_bone(defective, self.centre, self.directions)
        self.near_rad, self.context_rad, self.rim_rad = near_rad, context_rad, rim_rad
        self.smoothing, self.max_context, self.seed = smoothing, max_context, seed

    def _fit(self, rays: np.ndarray, values: np.ndarray, at: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Thin-plate spline through ``values`` on the ``rays`` (bool, M) directions, evaluated at ``at (H, 3)``."""
        index = np.flatnonzero(rays)
        if len(index) > self.max_context:
            index = rng.choice(index, self.max_context, replace=False)
        spline = RBFInterpolator(self.directions[index], values[index], kernel="thin_plate_spline",
                                 smoothing=self.smoothing)
        return spline(at)

    def missing_points(self, implant: np.ndarray) -> np.ndarray:
        """``(M, 3)`` voxel coords on the interpolated outer and inner surfaces across the holes in the
        directions of ``implant (N, 3)`` (a sample's implant points); M may be 0. Points are thinned in
        proportion to radius squared, so their density per area is even like the sample's."""
        rng = np.random.default_rng(self.seed)
        to_implant, _ = cKDTree(unit_directions(implant, self.centre)).query(self.directions)
        hole = ~self.hit & (to_implant <= self.near_rad)
        if not hole.any():
            return np.empty((0, 3))
        to_hole, _ = cKDTree(self.directions[hole]).query(self.directions)
        context = self.hit & (to_hole <= self.context_rad)
        solid = context & (to_hole > self.rim_rad)
        if solid.sum() < 20:  # too little bone around the hole to interpolate
            return np.empty((0, 3))
        at = self.directions[hole]
        outer = self._fit(context, self.outer, at, rng)
        thickness = np.maximum(self._fit(solid, self.outer - self.inner, at, rng), 1.0)
        radius = np.concatenate([outer, outer - thickness])
        points = self.centre + np.concatenate([at, at]) * radius[:, None]
        return points[rng.random(len(points)) < (radius / radius.max()) ** 2]
