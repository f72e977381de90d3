"""Anatomical priors: the missing bone estimated from the defective skull, merged into a diffusion sample.

Seen from its centre, the cranial vault is a shell: along a direction u the bone spans the radii
[r_out(u) - thickness(u), r_out(u)], and both change slowly with u. :class:`SkullRays` casts rays from
the skull's centre and estimates the shell across the hole the sample filled in two ways:

- **mirror** (one-sided defects): the aligned mirror image of the skull (:mod:`scripts.mirror`) has
  bone where the defect is. Its outer surface and thickness are read off the same rays, and the outer
  surface is shifted by the offset between skull and mirror image on the bone around the hole
  (interpolated into the hole), so that the mirrored bone meets the rim of the hole even where the
  skull is asymmetric.
- **shell** (defects across the midline, whose mirror image is the same hole): the outer radius and the
  thickness of the bone around the hole, interpolated into it. Classical cranioplasty planning
  interpolates the vault the same way.

Interpolation is by thin-plate splines over unit directions (scipy's ``RBFInterpolator``). Only the
holes the sample points at are filled (the sample says where the defect is; the face, skull base and
orbits stay open), and :func:`merge_prior_points` replaces the sample's points in those directions,
so the implant's outline comes from the sample and its surface from the prior. The synthetic skulls
are star-shaped around their centre by construction (scripts/data/synthetic.py), where these priors
are at their best; real vaults are close to it, the face and skull base are not.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.interpolate import RBFInterpolator
from scipy.spatial import cKDTree

from scripts.mirror import mirrored_skull

__all__ = ["unit_directions", "merge_prior_points", "sphere_directions", "radial_bone", "SkullRays"]


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
    sphere, about radians) from every generated point are dropped; generated points within ``cover_rad``
    of a kept estimate point are "covered" and replaced by as many kept estimate points (drawn by
    ``rng``). Returns the merged ``(N, 3)`` points and the covered fraction; with less than
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
    distance = np.linalg.norm(np.argwhere(mask) - centre, axis=1)
    if len(distance) == 0:
        return np.zeros(len(directions), bool), np.zeros(len(directions)), np.zeros(len(directions))
    # only the radii the bone spans are sampled (a multiple of step, so the samples do not move)
    radii = np.arange(step * np.floor(max(distance.min() - 1.0, 0.0) / step), distance.max() + 1.0 + step, step)
    coords = centre[:, None, None] + directions.T[:, :, None] * radii  # (3, M, R)
    bone = ndimage.map_coordinates(mask.astype(np.uint8), coords.reshape(3, -1), order=0, mode="constant")
    bone = bone.reshape(len(directions), len(radii)) > 0
    hit = bone.any(axis=1)
    last = len(radii) - 1 - np.argmax(bone[:, ::-1], axis=1)
    gap = ~bone & (np.arange(len(radii)) < last[:, None])  # empty samples inside the last bone sample
    last_gap = len(radii) - 1 - np.argmax(gap[:, ::-1], axis=1)
    first = np.where(gap.any(axis=1), last_gap + 1, np.argmax(bone, axis=1))
    return hit, radii[last] + 0.5 * step, radii[first] - 0.5 * step


class SkullRays:
    """Rays from a defective skull's centre, and the two priors' estimates of its missing bone.

    Args:
        defective: ``(X, Y, Z)`` bool mask on an isotropic grid.
        centre: ``(3,)`` the skull's centre, voxel coords (rays start there).
        mirror: the 4x4 voxel transform onto the skull's aligned mirror image
            (:func:`scripts.mirror.mirror_transform`); None: no mirror estimate.
        num_directions: rays cast (20,000: about 1.4 degrees apart).
        near_rad: hole directions farther than this (chord on the unit sphere, about radians) from every
            sampled implant point are not the defect (face, skull base, orbits) and are left open.
        context_rad: rays that meet bone within this angle of the hole carry the fits.
        rim_rad: rays this close to the hole graze its cut edge, so they give the outer radius but not
            the thickness.
        smoothing: the thin-plate splines' smoothing (voxel-quantised radii are noisy by about half a voxel).
        max_context: rays used per fit (a random subset; the spline's solve is cubic in it).
        seed: seeds that subset and the area-weighted thinning of the surface points.
    """

    def __init__(self, defective: np.ndarray, centre: np.ndarray, mirror: np.ndarray | None = None,
                 num_directions: int = 20000, near_rad: float = 0.1, context_rad: float = 0.3,
                 rim_rad: float = 0.05, smoothing: float = 3.0, max_context: int = 1500, seed: int = 0) -> None:
        self.centre = np.asarray(centre, dtype=float)
        self.directions = sphere_directions(num_directions)
        self.hit, self.outer, self.inner = radial_bone(defective, self.centre, self.directions)
        self.mirror = None if mirror is None else radial_bone(mirrored_skull(defective, mirror), self.centre,
                                                              self.directions)
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

    def _hole(self, implant: np.ndarray, open_rays: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ``open_rays`` (bool, M) within ``near_rad`` of ``implant (N, 3)``'s directions, and every ray's
        angular distance to them ((M,) bool, (M,))."""
        to_implant, _ = cKDTree(unit_directions(implant, self.centre)).query(self.directions)
        hole = open_rays & (to_implant <= self.near_rad)
        to_hole = cKDTree(self.directions[hole]).query(self.directions)[0] if hole.any() else np.full(len(hole), np.inf)
        return hole, to_hole

    def _surfaces(self, hole: np.ndarray, outer: np.ndarray, thickness: np.ndarray, rng) -> np.ndarray:
        """``(M, 3)`` points on the outer and inner surfaces along the ``hole`` rays, thinned in proportion
        to radius squared so that their density per area is even like a sample's."""
        radius = np.concatenate([outer, outer - np.maximum(thickness, 1.0)])
        at = self.directions[hole]
        points = self.centre + np.concatenate([at, at]) * radius[:, None]
        return points[rng.random(len(points)) < (radius / radius.max()) ** 2]

    def shell_points(self, implant: np.ndarray) -> np.ndarray:
        """``(M, 3)`` voxel coords on the outer and inner surfaces of the bone around the holes in the
        directions of ``implant (N, 3)`` (a sample's implant points), interpolated across them; M may be 0."""
        rng = np.random.default_rng(self.seed)
        hole, to_hole = self._hole(implant, ~self.hit)
        context = self.hit & (to_hole <= self.context_rad)
        solid = context & (to_hole > self.rim_rad)
        if hole.sum() == 0 or solid.sum() < 20:  # no hole, or too little bone around it to interpolate
            return np.empty((0, 3))
        at = self.directions[hole]
        outer = self._fit(context, self.outer, at, rng)
        return self._surfaces(hole, outer, self._fit(solid, self.outer - self.inner, at, rng), rng)

    def mirror_points(self, implant: np.ndarray) -> np.ndarray:
        """``(M, 3)`` voxel coords on the mirror image's outer and inner surfaces in the holes in the
        directions of ``implant (N, 3)`` where the mirror image has bone; the outer surface is shifted by
        the skull-minus-mirror offset of the outer radius on the bone around them, interpolated into them.
        M may be 0 (no mirror transform, no such hole, or too little bone around it)."""
        if self.mirror is None:
            return np.empty((0, 3))
        rng = np.random.default_rng(self.seed)
        mirror_hit, mirror_outer, mirror_inner = self.mirror
        hole, to_hole = self._hole(implant, ~self.hit & mirror_hit)
        context = self.hit & mirror_hit & (to_hole <= self.context_rad)
        if hole.sum() < 20 or context.sum() < 20:
            return np.empty((0, 3))
        offset = self._fit(context, self.outer - mirror_outer, self.directions[hole], rng)
        return self._surfaces(hole, mirror_outer[hole] + offset, (mirror_outer - mirror_inner)[hole], rng)
