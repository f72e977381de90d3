"""Anatomical priors: the missing bone estimated from the defective skull, merged into a diffusion sample.

Seen from its centre, the cranial vault is a shell: along a direction u the bone spans the radii
[r_out(u) - thickness(u), r_out(u)], and both change slowly with u. :class:`SkullRays` casts rays from
the skull's centre and estimates the shell across the hole the sample filled in two ways
(:class:`RayEstimate`):

- **mirror** (one-sided defects): the aligned mirror image of the skull (:mod:`scripts.mirror`) has
  bone where the defect is. Its thickness is read off the same rays; its outer radius is a weighted mean
  of the mirror image's, shifted by the offset between skull and mirror image on the bone around the hole
  (interpolated into the hole, so that the mirrored bone meets the rim even where the skull is
  asymmetric), and the shell's below (``shell_weight``).
- **shell** (defects across the midline, whose mirror image is the same hole): the outer radius and the
  thickness of the bone around the hole, interpolated into it. Classical cranioplasty planning
  interpolates the vault the same way.

Interpolation is by thin-plate splines over unit directions (scipy's ``RBFInterpolator``). Only the
holes the sample points at are filled (the sample says where the defect is; the face, skull base and
orbits stay open). An estimate is used twice: as surface points that :func:`merge_prior_points` puts in
place of the sample's points in its directions (what the voxelizer sees), and as voxels
(:meth:`SkullRays.fill`) that replace the voxelized implant there. The synthetic skulls are star-shaped
around their centre by construction (scripts/data/synthetic.py), where these priors are at their best;
real vaults are close to it, the face and skull base are not.

The mirror also tells natural openings from a one-sided defect (:meth:`SkullRays.mirrored_openings`): an
orbit is open on both sides of the skull, and the sample has no points at its mirror image, while a
one-sided defect has bone there.

:class:`AnatomicalPriors` is what the inference config builds (its ``priors``) and the generator runs:
the switches, every tuned number with why and where it was measured, and per case :meth:`~AnatomicalPriors.merge`
(the points, before the voxelizer; it returns the case's :class:`CasePriors`) and
:meth:`~AnatomicalPriors.voxels` (the members' masks, after it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.interpolate import RBFInterpolator
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from scipy.special import ndtr

from scripts.data.points import normalization_params
from scripts.mirror import mirror_transform, mirrored_skull

__all__ = ["unit_directions", "merge_prior_points", "sphere_directions", "radial_bone", "RayEstimate", "SkullRays",
           "CasePriors", "AnatomicalPriors"]


def unit_directions(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Unit vectors from ``centre (3,)`` to ``points (N, 3)``."""
    offsets = points - centre
    return offsets / np.maximum(np.linalg.norm(offsets, axis=1, keepdims=True), 1e-9)


def merge_prior_points(
    generated: np.ndarray,
    missing: np.ndarray,
    centre: np.ndarray,
    rng: np.random.Generator,
    *,
    near_rad: float,
    cover_rad: float,
    min_cover: float,
) -> tuple[np.ndarray, float]:
    """Merge a sample's implant points with a prior's estimate of the missing bone.

    ``generated (N, 3)`` and ``missing (M, 3)`` in the same coordinates, ``centre (3,)`` the skull's
    centre. Estimate points whose direction from the centre is more than ``near_rad`` (chord on the unit
    sphere, about radians) from every generated point are dropped; generated points within ``cover_rad``
    of a kept estimate point are "covered" and replaced by as many kept estimate points (drawn by
    ``rng``). Returns the merged ``(N, 3)`` points and the covered fraction; with less than
    ``min_cover`` covered, the sample is returned unchanged with fraction 0. The numbers are
    :class:`AnatomicalPriors`' (:meth:`AnatomicalPriors.merge_estimate`); an estimate of :class:`SkullRays`
    with the same ``near_rad`` lies within it of the sample by construction, so the first test keeps all of it.
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


@dataclass
class RayEstimate:
    """A prior's bone in a skull's holes: along ``directions[hole]`` of :class:`SkullRays` it spans the radii
    [outer - thickness, outer] (voxels). ``hole`` (M,) bool over the rays; ``outer``, ``thickness`` (H,) for
    the H hole rays, thickness >= 1."""

    hole: np.ndarray
    outer: np.ndarray
    thickness: np.ndarray


class SkullRays:
    """Rays from a defective skull's centre, and the two priors' estimates of its missing bone
    (:class:`RayEstimate`), as surface points to merge into a sample and as voxels.

    Args:
        defective: ``(X, Y, Z)`` bool mask on an isotropic grid.
        centre: ``(3,)`` the skull's centre, voxel coords (rays start there).
        mirror: the 4x4 voxel transform onto the skull's aligned mirror image
            (:func:`scripts.mirror.mirror_transform`); None: no mirror estimate.
        num_directions: rays cast.
        near_rad: hole directions farther than this (chord on the unit sphere, about radians) from every
            sampled implant point are not the defect (face, skull base, orbits) and are left open.
        context_rad: rays that meet bone within this angle of the hole carry the fits.
        rim_rad: rays this close to the hole graze its cut edge, so they give the outer radius but not
            the thickness.
        smoothing: the thin-plate splines' smoothing (voxel-quantised radii are noisy by about half a voxel).
        max_context: rays used per fit (a random subset; the spline's solve is cubic in it).
        opening_rad, min_opening: :meth:`fill` leaves out the hole rays within ``opening_rad`` of an open
            region of at least ``min_opening`` steradians that the hole runs into.
        shell_weight: the shell's weight in the mirror estimate's outer radius (:meth:`mirror_estimate`).
        seed: seeds that subset and the area-weighted thinning of the surface points.

    The numbers have no defaults here: their values, and why, are :class:`AnatomicalPriors`', whose
    :meth:`~AnatomicalPriors.rays` builds this class with them.
    """

    def __init__(self, defective: np.ndarray, centre: np.ndarray, mirror: np.ndarray | None = None, *,
                 num_directions: int, near_rad: float, context_rad: float, rim_rad: float, smoothing: float,
                 max_context: int, opening_rad: float, min_opening: float, shell_weight: float,
                 seed: int = 0) -> None:
        self.centre = np.asarray(centre, dtype=float)
        self.directions = sphere_directions(num_directions)
        self.hit, self.outer, self.inner = radial_bone(defective, self.centre, self.directions)
        self.mirror = None if mirror is None else radial_bone(mirrored_skull(defective, mirror), self.centre,
                                                              self.directions)
        self.mirror_transform = mirror
        self.near_rad, self.context_rad, self.rim_rad = near_rad, context_rad, rim_rad
        self.smoothing, self.max_context, self.seed = smoothing, max_context, seed
        self.opening_rad, self.min_opening, self.shell_weight = opening_rad, min_opening, shell_weight
        self._tree = cKDTree(self.directions)

    def _fit(self, rays: np.ndarray, values: np.ndarray, at: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Thin-plate spline through ``values`` on the ``rays`` (bool, M) directions, evaluated at ``at (H, 3)``."""
        index = np.flatnonzero(rays)
        if len(index) > self.max_context:
            index = rng.choice(index, self.max_context, replace=False)
        spline = RBFInterpolator(self.directions[index], values[index], kernel="thin_plate_spline",
                                 smoothing=self.smoothing)
        return spline(at)

    def _around(self, implant: np.ndarray, open_rays: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The hole: the ``open_rays`` (bool, M) within ``near_rad`` of ``implant (N, 3)``'s directions; its
        context: the rays that meet bone within ``context_rad`` of it; and the solid part of the context,
        farther than ``rim_rad`` from it (rays that do not graze the hole's cut edge). (M,) bool each."""
        to_implant, _ = cKDTree(unit_directions(implant, self.centre)).query(self.directions)
        hole = open_rays & (to_implant <= self.near_rad)
        to_hole = cKDTree(self.directions[hole]).query(self.directions)[0] if hole.any() else np.full(len(hole), np.inf)
        context = self.hit & (to_hole <= self.context_rad)
        return hole, context, context & (to_hole > self.rim_rad)

    def points(self, estimate: RayEstimate | None) -> np.ndarray:
        """``(P, 3)`` voxel coords on the outer and inner surfaces of an ``estimate``'s bone, thinned in
        proportion to radius squared so that their density per area is even like a sample's; P may be 0."""
        if estimate is None:
            return np.empty((0, 3))
        rng = np.random.default_rng(self.seed)
        radius = np.concatenate([estimate.outer, estimate.outer - estimate.thickness])
        at = self.directions[estimate.hole]
        points = self.centre + np.concatenate([at, at]) * radius[:, None]
        return points[rng.random(len(points)) < (radius / radius.max()) ** 2]

    def _openings(self, hole: np.ndarray) -> np.ndarray:
        """(M,) bool: where the ``hole`` (M,) runs into a natural opening (orbit, skull base): the open rays
        outside the hole next to it that belong to an open region of at least ``min_opening`` steradians."""
        spacing = 1.6 * np.sqrt(4 * np.pi / len(self.directions))  # neighbouring rays are closer than this
        others = np.flatnonzero(~self.hit & ~hole)
        pairs = cKDTree(self.directions[others]).query_pairs(spacing, output_type="ndarray")
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(others),) * 2)
        labels = connected_components(graph, directed=False)[1]
        large = np.bincount(labels)[labels] * 4 * np.pi / len(self.directions) >= self.min_opening
        touching = cKDTree(self.directions[hole]).query(self.directions[others])[0] <= spacing
        openings = np.zeros(len(hole), bool)
        openings[others] = large & touching
        return openings

    def _nearest_rays(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Voxel coords ``index (V, 3)`` -> the index of each one's nearest ray (V,) and its radius (V,)."""
        offsets = index - self.centre
        radius = np.linalg.norm(offsets, axis=1)
        return self._tree.query(offsets / np.maximum(radius, 1e-9)[:, None])[1], radius

    def mirrored_openings(self, implant: np.ndarray) -> np.ndarray:
        """(M,) bool: natural openings by symmetry, the open rays whose mirror image is open too and farther
        than ``near_rad`` from the mirror image of every point of ``implant (N, 3)`` (a sample's implant points).

        An orbit is open on both sides and the sample does not point at the other orbit; a one-sided
        defect's mirror image is bone, and a defect across the midline is its own mirror image, which the
        sample covers. All False without a mirror transform.
        """
        if self.mirror is None:
            return np.zeros(len(self.directions), bool)
        mirrored = implant @ self.mirror_transform[:3, :3].T + self.mirror_transform[:3, 3]
        to_mirrored, _ = cKDTree(unit_directions(mirrored, self.centre)).query(self.directions)
        return ~self.hit & ~self.mirror[0] & (to_mirrored > self.near_rad)

    def clear_openings(self, mask: np.ndarray, implant: np.ndarray) -> np.ndarray:
        """``mask (X, Y, Z)`` bool (an implant) without its voxels whose nearest ray is one of the
        :meth:`mirrored_openings` of ``implant (N, 3)``: the sample's spill into an orbit, which the
        voxelizer and the shell would otherwise close."""
        openings = self.mirrored_openings(implant)
        index = np.argwhere(mask)
        if not openings.any() or not len(index):
            return mask
        cleared = mask.copy()
        cleared[tuple(index[openings[self._nearest_rays(index)[0]]].T)] = False
        return cleared

    def _cone(self, estimate: RayEstimate, shape: tuple[int, ...]):
        """The voxels of a ``shape`` grid whose nearest ray is one of the ``estimate``'s hole rays that :meth:`fill`
        keeps, within 3 voxels of its bone's bounding box: their ``index (V, 3)``, ``radius (V,)`` and their
        ray's ``outer`` and ``thickness`` (V,) each; None where no hole ray is kept. Hole rays within
        ``opening_rad`` of where the hole runs into a natural opening (:meth:`_openings`) are left out: the
        sample's points spill into such an opening as densely as they fill the defect, and a filled shell would
        close it."""
        openings = self._openings(estimate.hole)
        keep = np.ones(estimate.hole.sum(), bool)
        if openings.any():
            keep = cKDTree(self.directions[openings]).query(self.directions[estimate.hole])[0] > self.opening_rad
        if not keep.any():
            return None
        hole = estimate.hole.copy()
        hole[hole] = keep
        outer_kept, thickness_kept = estimate.outer[keep], estimate.thickness[keep]
        at = self.directions[hole]
        ends = self.centre + np.concatenate([at * (outer_kept - thickness_kept)[:, None], at * outer_kept[:, None]])
        low = np.clip(np.floor(ends.min(axis=0)) - 3, 0, None).astype(int)  # the bone's box and 3 voxels around it
        high = np.minimum(np.ceil(ends.max(axis=0)) + 4, shape).astype(int)
        index = np.stack(np.meshgrid(*map(np.arange, low, high), indexing="ij"), axis=-1).reshape(-1, 3)
        nearest, radius = self._nearest_rays(index)
        ray = np.full(len(self.directions), -1)
        ray[hole] = np.arange(hole.sum())
        ray = ray[nearest]
        in_cone = ray >= 0
        return index[in_cone], radius[in_cone], outer_kept[ray[in_cone]], thickness_kept[ray[in_cone]]

    def fill(self, estimate: RayEstimate, shape: tuple[int, ...],
             sd: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """An ``estimate``'s bone as voxels of a ``shape`` grid: ``bone`` (voxels of its :meth:`_cone` whose
        radius lies in their ray's [outer - thickness, outer]), ``cone`` (the voxels of its :meth:`_cone`: the
        part of the grid the estimate speaks for), bool ``shape`` each, and for ``sd`` > 0 each voxel's
        ``probability`` of lying in the bone (float32 ``shape``, else None) when the outer and inner surfaces each
        lie off by independent Gaussian errors of ``sd`` voxels along the ray: Phi((outer - r) / sd)
        Phi((r - outer + thickness) / sd) in the cone, 0 elsewhere (``bone`` as ``sd`` goes to 0).

        Written here because the estimate is a radial interval per ray, which no voxelizer takes as input.
        """
        bone, cone = np.zeros(shape, bool), np.zeros(shape, bool)
        probability = np.zeros(shape, np.float32) if sd > 0 else None
        voxels = self._cone(estimate, shape)
        if voxels is None:
            return bone, cone, probability
        index, radius, outer, thickness = voxels
        cone[tuple(index.T)] = True
        bone[tuple(index[(radius <= outer) & (radius >= outer - thickness)].T)] = True
        if probability is not None:
            probability[tuple(index.T)] = ndtr((outer - radius) / sd) * ndtr((radius - outer + thickness) / sd)
        return bone, cone, probability

    def shell_estimate(self, implant: np.ndarray) -> RayEstimate | None:
        """The bone around the holes in the directions of ``implant (N, 3)`` (a sample's implant points),
        its outer radius and thickness interpolated across them; None without such a hole or bone around it."""
        rng = np.random.default_rng(self.seed)
        hole, context, solid = self._around(implant, ~self.hit)
        if hole.sum() == 0 or solid.sum() < 20:  # no hole, or too little bone around it to interpolate
            return None
        at = self.directions[hole]
        return RayEstimate(hole, self._fit(context, self.outer, at, rng),
                           np.maximum(self._fit(solid, self.outer - self.inner, at, rng), 1.0))

    def mirror_estimate(self, implant: np.ndarray) -> RayEstimate | None:
        """The mirror image's bone in the holes in the directions of ``implant (N, 3)`` where it has bone;
        None without a mirror transform, such a hole, or bone around it.

        Its outer radius is a weighted mean of two estimates whose errors are independent: the mirror
        image's, shifted by the skull-minus-mirror offset on the solid bone around the hole (interpolated
        into it), and, with weight ``shell_weight``, the skull's own outer radius interpolated across the
        hole (the shell's). Its thickness is the mirror image's.
        """
        if self.mirror is None:
            return None
        rng = np.random.default_rng(self.seed)
        mirror_hit, mirror_outer, mirror_inner = self.mirror
        hole, _, solid = self._around(implant, ~self.hit & mirror_hit)
        solid &= mirror_hit
        if hole.sum() < 20 or solid.sum() < 20:
            return None
        at = self.directions[hole]
        anchored = mirror_outer[hole] + self._fit(solid, self.outer - mirror_outer, at, rng)
        _, vault_context, _ = self._around(implant, ~self.hit)
        outer = (1.0 - self.shell_weight) * anchored + self.shell_weight * self._fit(vault_context, self.outer, at, rng)
        return RayEstimate(hole, outer, np.maximum((mirror_outer - mirror_inner)[hole], 1.0))


@dataclass
class CasePriors:
    """One case's priors, as :meth:`AnatomicalPriors.merge` returns them: the ``rays`` cast from the skull's
    centre and, per member, the prior that completed its implant points (``names``: "mirror", "shell" or
    "none"), the share of its implant points the prior gave (``fractions``, 0: the sample is kept) and the
    prior's estimate (``estimates``, None where no prior applies)."""

    rays: SkullRays
    names: list[str]
    fractions: list[float]
    estimates: list[RayEstimate | None]


class AnatomicalPriors:
    """The anatomical priors of the inference config (its ``priors``; docs/README.md, "The anatomical
    priors"): which of them run and every number they were tuned with. ``None`` in its place (the
    generator's default) runs none.

    The switches are the config's user options:

    Args:
        mirror: ``--mirror_prior``: each member's implant points where the skull's aligned mirror image has
            bone the skull lacks come from the mirrored bone, anchored to the bone around the hole
            (:meth:`SkullRays.mirror_estimate`).
        shell: ``--shell_prior``: members the mirror covers less than ``shell_below`` of (defects across the
            midline) take the skull's shell interpolated across the hole instead (:meth:`SkullRays.shell_estimate`).
        fill: ``--prior_fill``: a member's implant, in the directions its prior fills, is the prior's bone as
            voxels (:meth:`SkullRays.fill`) rather than the voxelizer's surface through the merged points,
            where the prior gave at least ``fill_above`` of its implant points.
        mirrored_openings: ``--mirrored_openings``, with ``mirror``: each member's implant leaves out the
            directions where the skull and its mirror image are both open and the mirror image of its sample
            has no points (:meth:`SkullRays.clear_openings`: an orbit the sample spilled into).

    The tuned numbers, each with why this value and where it was measured (sections of
    docs/history/training_notebook.md: "Merging the mirror into the sample" (0.7.0), "Anatomical priors
    from rays" (0.8.0), "The priors' bone as voxels" (0.9.0); "study": the 20 study cases, "seed 4242": the
    10 held-out cases of the second generator seed; DSC / bDSC / HD95 mm):

    Args:
        shell_below: 0.5: the shell replaces the mirror for a member below this mirror coverage; study DSC is
            flat from 0.4 to 0.7 (0.811 each, 0.808 at 0.3, 0.798 at 0.8), seed 4242 0.824-0.835 (0.8.0).
        fill_above: 0.5: the prior goes in as voxels only where it gave at least this share: every prior
            member of the 0.9.0 studies had 0.53 or more, the shell on the sample's skull without its defect
            0.14 (it would have put 3.9 ml over an opening; 0.9.0); not swept.
        near_rad: 0.1: the hole is the open rays within this chord (about radians) of the sample's implant
            directions; the sample's points are about 0.05 apart. Study 0.15 / 0.1 / 0.07: 0.860 / 0.844 /
            2.87, 0.860 / 0.850 / 2.08, 0.859 / 0.851 / 1.90; seed 4242 at 0.1 +0.003 DSC against 0.15
            (0.8.0, "A tighter hole"). The same reach marks the mirrored openings and bounds the merge.
        cover_rad: 0.08: a sample point within this chord of a kept estimate point is replaced by one;
            set with the 0.7.0 mirror merge (directions rather than distances: 0.760 against 0.739 DSC),
            not re-measured since.
        min_cover: 0.1: an estimate covering less than this share of a member's implant points leaves its
            sample as it is; set with the 0.7.0 mirror merge, not re-measured.
        num_directions: 20000: rays cast, about 1.4 degrees apart; 40,000 (1 degree) did not help (study
            0.860 / 0.846 / 2.24 against 0.860 / 0.850 / 2.08; 0.8.0).
        context_rad: 0.3: the rays meeting bone within this of the hole carry the splines; splines through
            up to 1,500 rays within 0.3 brought the outer radius error over 5 true holes from 0.85 to 0.50
            voxels, a wider context was not better (0.8.0).
        rim_rad: 0.05: rays closer to the hole graze its cut edge and give no thickness: the shell's
            thickness from rays beyond 0.05 lifted study DSC 0.732 -> 0.790 (0.8.0), the mirror's offset
            from them moved its outer radius error from -0.21 to -0.05 voxels (median, 0.9.0); only 0.05
            against none was measured.
        smoothing: 1.0: the thin-plate splines' smoothing; against the complete skull on the hole's rays
            (study) 0.3 / 1 / 3 / 10 gave median errors -0.31 / -0.08 / +0.09 / +0.30 voxels; 1 against 3
            study DSC +0.004, seed 4242 +0.009 (0.9.0, "Less smoothing").
        max_context: 1500: rays per spline fit (a random subset; the solve is cubic in it); 1,500 rays
            within ``context_rad`` against the nearest 200: see ``context_rad`` (0.8.0); not swept.
        shell_weight: 0.3: the shell's weight in the mirror's outer radius (their errors are opposite on
            parietotemporal defects): 0 / 0.3 / 0.5 study DSC 0.873 / 0.885 / 0.884, seed 4242 0.869 / 0.877 /
            0.875 (0.9.0, "The mirror's outer surface").
        opening_rad: 0.15: the fill leaves out the hole rays within this of a natural opening the hole runs
            into; prototype on the study cases 0.10 / 0.15 / 0.20: HD95 2.19 / 2.05 / 2.02 mm, none 2.80
            (0.9.0, "Natural openings").
        min_opening: 0.05: steradians an open region needs to count as a natural opening; the synthetic
            orbits span 0.06-0.16 sr, what is left of a defect beyond ``near_rad`` up to 0.03 (0.9.0);
            set between the two, not swept.
        mirror_points: 6000: Poisson-disk surface points the mirror's ICP aligns (about 3 voxels apart on a
            128^3 skull; mirror and ICP about 0.6 s per case on one core, 0.7.0); not re-measured.
        icp_distance: 0.3: the ICP's correspondence distance in the denoiser's units (the skull's longest
            extent / 6; about 6 voxels on the 128^3 grid); not re-measured.
        surface_sd: 0.5: in an ensemble, the radial error (voxels) assumed of a filled prior's outer and inner
            surfaces: each member's probability of bone in the cone its prior fills is the ``probability`` of
            :meth:`SkullRays.fill` instead of 0 or 1, so that the ensemble's probability and variance maps (not
            its members' masks or their vote) say how sure the surfaces are; 0: the members' 0 / 1 share. The
            ensembles' errors lie within a voxel of the implant's surfaces. On the validation set (15 cases, 5
            members, tools/calibration.py) 0 / 0.5 / 1.0 gave AUROC of the variance for wrong voxels 0.855 /
            0.871 / 0.851, ECE 0.050 / 0.048 / 0.075 and a Spearman correlation of ``expected_wrong_ml`` with the
            true wrong volume of 0.46 / 0.81 / 0.74 (docs/benchmarks.md, "Ensembles and uncertainty").

    Other numbers of the priors were not tuned and are not arguments: the rays' sampling step (half a voxel,
    :func:`radial_bone`), the neighbour spacing of the ray graph (1.6 ray spacings), the 20 rays an estimate
    needs to be fitted at all, and the ICP's 50 iterations (:func:`scripts.mirror.mirror_transform`).
    """

    def __init__(
        self,
        mirror: bool = True,
        shell: bool = True,
        fill: bool = True,
        mirrored_openings: bool = True,
        shell_below: float = 0.5,
        fill_above: float = 0.5,
        near_rad: float = 0.1,
        cover_rad: float = 0.08,
        min_cover: float = 0.1,
        num_directions: int = 20000,
        context_rad: float = 0.3,
        rim_rad: float = 0.05,
        smoothing: float = 1.0,
        max_context: int = 1500,
        shell_weight: float = 0.3,
        opening_rad: float = 0.15,
        min_opening: float = 0.05,
        mirror_points: int = 6000,
        icp_distance: float = 0.3,
        surface_sd: float = 0.5,
    ) -> None:
        self.mirror, self.shell, self.fill = bool(mirror), bool(shell), bool(fill)
        self.mirrored_openings = bool(mirrored_openings)
        self.shell_below, self.fill_above = float(shell_below), float(fill_above)
        self.near_rad, self.cover_rad, self.min_cover = float(near_rad), float(cover_rad), float(min_cover)
        self.num_directions, self.context_rad, self.rim_rad = int(num_directions), float(context_rad), float(rim_rad)
        self.smoothing, self.max_context, self.shell_weight = float(smoothing), int(max_context), float(shell_weight)
        self.opening_rad, self.min_opening = float(opening_rad), float(min_opening)
        self.mirror_points, self.icp_distance = int(mirror_points), float(icp_distance)
        self.surface_sd = float(surface_sd)

    @property
    def enabled(self) -> bool:
        """Whether any prior runs (the mirror or the shell; the other switches act on their estimates)."""
        return self.mirror or self.shell

    def mirror_transform(self, defective: np.ndarray, axis: int = 0, seed: int = 0) -> np.ndarray:
        """:func:`scripts.mirror.mirror_transform` with ``mirror_points`` and ``icp_distance``."""
        return mirror_transform(defective, axis, num_surface=self.mirror_points, icp_distance=self.icp_distance,
                                seed=seed)

    def rays(self, defective: np.ndarray, centre: np.ndarray, mirror: np.ndarray | None = None,
             seed: int = 0) -> SkullRays:
        """:class:`SkullRays` of ``defective`` from ``centre`` (``mirror``: its mirror transform, or None)
        with these numbers."""
        return SkullRays(defective, centre, mirror, num_directions=self.num_directions, near_rad=self.near_rad,
                         context_rad=self.context_rad, rim_rad=self.rim_rad, smoothing=self.smoothing,
                         max_context=self.max_context, opening_rad=self.opening_rad, min_opening=self.min_opening,
                         shell_weight=self.shell_weight, seed=seed)

    def merge_estimate(self, generated: np.ndarray, missing: np.ndarray, centre: np.ndarray,
                       rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """:func:`merge_prior_points` with ``near_rad``, ``cover_rad`` and ``min_cover``."""
        return merge_prior_points(generated, missing, centre, rng, near_rad=self.near_rad, cover_rad=self.cover_rad,
                                  min_cover=self.min_cover)

    def merge(self, defective: np.ndarray, clouds: np.ndarray, num_condition: int,
              seed: int = 0) -> tuple[np.ndarray, CasePriors]:
        """Completed clouds (K, N, 3) voxel coords of ``defective`` (their first ``num_condition`` points
        the skull's) -> the same with each member's implant points merged with a prior's estimate of the
        missing bone, and the case's :class:`CasePriors`.

        A member takes the mirror's estimate where it covers at least ``shell_below`` of its implant points,
        else (with ``shell``) the smooth shell's where that covers more (the mirror is across the canonical
        cube's axis 0, left-right, :mod:`scripts.frame`). The rays are cast once per case, from member 0's
        centre (the bounding-box centre of its condition); ``seed`` seeds the mirror's surface points, the
        rays' subsets and the merge's draws. The clouds come back as they are when no member changed
        (a copy otherwise: the condition points stay, only the implant points change).
        """
        centre = normalization_params(clouds[0, :num_condition])[0]
        mirror = self.mirror_transform(defective, seed=seed) if self.mirror else None
        rays = self.rays(defective, centre, mirror, seed=seed)
        rng = np.random.default_rng(seed)
        merged, names, fractions, estimates = [], [], [], []
        for implant in clouds[:, num_condition:]:
            estimate = rays.mirror_estimate(implant)
            points, fraction = self.merge_estimate(implant, rays.points(estimate), centre, rng)
            prior = "mirror" if fraction > 0 else "none"
            if self.shell and fraction < self.shell_below:
                shell = rays.shell_estimate(implant)
                shell_points, shell_fraction = self.merge_estimate(implant, rays.points(shell), centre, rng)
                if shell_fraction > fraction:
                    points, fraction, prior, estimate = shell_points, shell_fraction, "shell", shell
            merged.append(points)
            names.append(prior)
            fractions.append(fraction)
            estimates.append(estimate if prior != "none" else None)
        case = CasePriors(rays, names, fractions, estimates)
        changed = [k for k, prior in enumerate(names) if prior != "none"]
        if changed:
            clouds = clouds.copy()
            clouds[changed, num_condition:] = np.stack([merged[k] for k in changed])
        return clouds, case

    def voxels(self, case: CasePriors, defective: np.ndarray, generated: np.ndarray, completes: np.ndarray,
               implants: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """The members' complete skulls and implants (K, X, Y, Z) bool, made by the voxelizer from the
        merged points ``generated`` (K, Nt, 3), with the priors' voxels, and for an ensemble with ``surface_sd``
        each member's probability of bone (K, X, Y, Z) float32 (else None): (completes, implants, probabilities),
        or None where none of the steps below changed them (the voxelizer's result stands, mean implant included).

        - ``fill``: each member whose prior gave at least ``fill_above`` of its points takes, in the
          directions its prior fills, the prior's bone as voxels (:meth:`SkullRays.fill`); the voxelized
          implant stays elsewhere (the rim of a hole the prior does not reach). The prior's bone goes in
          uncleaned: the clean-up's opening is made for the voxelizer's films and specks and thins a 3-4
          voxel shell (docs/history/training_notebook.md measures it). Its probability of bone there is the
          fill's ``probability`` with ``surface_sd``; elsewhere a member's implant is 0 or 1.
        - ``mirror`` and ``mirrored_openings``: each member's implant (and complete skull) is cleared of the
          natural openings its points spilled into, as the mirror shows them (:meth:`SkullRays.clear_openings`).
        """
        changed = False
        soft = self.surface_sd > 0 and len(implants) > 1
        probabilities = implants.astype(np.float32) if soft else None
        if self.fill:
            filled = [k for k, (estimate, fraction) in enumerate(zip(case.estimates, case.fractions))
                      if estimate is not None and fraction >= self.fill_above]
            if filled:
                completes, implants = completes.copy(), implants.copy()
                for k in filled:
                    bone, cone, probability = case.rays.fill(case.estimates[k], defective.shape,
                                                             self.surface_sd if soft else 0.0)
                    implants[k] = (bone & ~defective) | (implants[k] & ~cone)
                    completes[k] = (completes[k] & ~cone) | bone | defective
                    if soft:
                        probabilities[k] = np.where(cone & ~defective, probability, probabilities[k] * ~cone)
                changed = True
        if self.mirror and self.mirrored_openings:
            # clearing is per voxel, so the soft members' support (which holds their implants) is cleared once
            kept = np.stack([case.rays.clear_openings(mask, points)
                             for mask, points in zip(probabilities > 0 if soft else implants, generated)])
            cleared = implants & kept
            completes = completes & ~(implants & ~cleared)
            if soft:
                probabilities *= kept
            implants, changed = cleared, True
        return (completes, implants, probabilities) if changed else None

    def settings(self, case: CasePriors | None) -> dict:
        """The priors of a case (``case``: None where none ran), as the case summary reports them."""
        return {
            "mirror_prior": self.mirror,
            "shell_prior": self.shell,
            "prior": [] if case is None else list(case.names),
            "prior_fraction": [] if case is None else [round(f, 3) for f in case.fractions],
            "prior_fill": self.fill,
            "mirrored_openings": self.mirror and self.mirrored_openings,
        }
