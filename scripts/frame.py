"""The canonical head frame: every skull is seen upright, centred and at one size before the model.

The denoiser, the priors and the voxelizer were trained on upright, adult-sized skulls centred in a
128^3 grid of 1.6 mm voxels. A scan's head may be turned, tilted, small or off-centre, so each skull's
own frame is estimated from its shape (in world millimetres, independent of the scanner's axes) and the
mask is resampled into a *canonical cube* where the head sits as the training skulls do:

1. **mid-sagittal plane**: the plane across which the skull best matches its own mirror image. A coarse
   search over planes with normals within ``SEARCH_DEG`` of the header's left-right axis (symmetry scored
   by the mean distance, capped at ``SCORE_CAP_MM``, of the mirrored surface points to the skull); its
   ``PLANE_CANDIDATES`` best distinct planes are each refined by rigid ICP of the mirror image onto the skull
   (Open3D), and the fit whose mirror image matches the skull best by the median distance wins.
2. **anterior and superior axes**: the principal axis of the skull within that plane (its long,
   front-back axis), refined by rigid ICP onto a canonical skull that ships with the bundle;
   signs follow the header (anterior stays anterior).
3. **size and position**: the skull's extent along left-right and front-back (its surface points and
   their mirror images, so a one-sided defect does not shrink it) against ``REFERENCE_SIZE_MM``, the
   same measure on upright training skulls; the cube is centred on the skull's bounding box.
4. **proportions**: the skull's width, length and height relative to the canonical skull's, from a fit with one
   scale per axis onto it (a long, narrow or flat head is seen with the canonical skull's proportions; the
   fit's correspondences come only from the bone there is, so a defect or a mandible does not move them).

Each step is equivariant: a rotated, moved, scaled or stretched copy of a skull gets the same canonical image up
to resampling. The frame is a voxel-to-world affine, so the implant goes back onto the input grid in one
resampling (:func:`scripts.data.resample.to_original_grid`). Where no frame can be estimated (too little
bone, no mirror symmetry), the header's axes are used with a logged warning and the summary says so.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import open3d as o3d
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, SpatialResample
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from scripts.priors import sphere_directions

__all__ = ["MODEL_GRIDS", "HeadFrame", "estimate_frame", "canonical_affine", "to_canonical", "CanonicalFramed"]

logger = logging.getLogger(__name__)

# (cube voxels across the field of view, voxel size in mm) of each preset's training data: the small
# preset trains on 128^3 synthetic skulls of 1.6 mm (configs/synthetic.json); the paper on SkullBreak.
MODEL_GRIDS = {"small": (128, 1.6), "small_mirror": (128, 1.6), "paper": (512, 0.4), "tiny": (64, 3.2)}
POINT_SPACING_MM = 1.5  # surface points for the estimate: boundary voxels of the mask coarsened to ~1.5 mm
MAX_POINTS = 10000
SEARCH_DEG = 40.0  # plane normals searched around the header's left-right axis (poses up to 25 deg per axis)
SEARCH_OFFSETS_MM = np.arange(-15.0, 15.1, 3.0)  # plane offsets searched around the centroid
SCORE_CAP_MM = 5.0
PROBE_POINTS = 250  # surface points that score each candidate plane
# distinct coarse-search minima refined into full plane fits; the one whose mirror image matches the skull best
# (median distance) wins. The coarse score is a capped mean that a large one-sided hole can pull to a plane
# rolled by ~40 degrees (a small head with a parietotemporal defect: 1 of 152 training skulls,
# tools/pose_study.py planes)
PLANE_CANDIDATES = 3
CANDIDATE_SEPARATION_DEG = 10.0
ICP_POINTS = 4000  # surface points in each ICP (the plane's, the canonical skull's)
ICP_DISTANCE_MM = 6.0  # correspondences of the final mirror-to-skull ICP
# median mirror-to-skull distance above which the skull is not symmetric enough for a frame (mm); a guard,
# far above what skulls give (generator skulls with any defect class, in any pose: 0.7-1.0 mm, tools/pose_study.py)
MAX_RESIDUAL_MM = 6.0
MIN_POINTS = 500  # fewer surface points: a fragment, no frame
# a whole skull spans 0.55-1.5 x the reference (an infant's to a large adult's head), else a fragment
MIN_SCALE, MAX_SCALE = 0.55, 1.5
# share of the canonical skull within 8 mm of the bone and its mirror image after the fit, below which
# the bone is no whole vault (training skulls with any defect class: 0.91 or more, tools/pose_study.py
# calibrate; half a skull: 0.43)
MIN_COVERAGE = 0.7
TEMPLATE = Path(__file__).resolve().parents[1] / "models" / "canonical_skull.npy"
# mean of the left-right and front-back extents (1st-99th percentile) of upright training skulls (mm)
REFERENCE_SIZE_MM = 160.0
# the proportions fit: rounds of SCALE_STEPS per-axis scale fits (least squares on the point pairs within
# FIT_DISTANCE_MM) and one rigid ICP; proportions beyond the bounds are clipped to them (the widened training
# skulls span 0.90-1.11, 1st-99th percentile: tools/pose_study.py calibrate --head_scale ... --head_stretch 0.1)
PROPORTION_ROUNDS, SCALE_STEPS = 2, 15
FIT_DISTANCE_MM = 8.0
MIN_PROPORTION, MAX_PROPORTION = 0.8, 1.25


@dataclass(frozen=True)
class HeadFrame:
    """A skull's frame in world millimetres: ``rotation (3, 3)`` columns = its left-right, posterior-
    anterior and inferior-superior axes; ``centre (3,)`` its bounding-box centre; ``size_mm`` its
    size measure; ``residual_mm`` the median mirror-to-skull distance of the plane fit; ``source``
    "skull" (estimated) or "header" (fallback); ``proportions (3,)`` the head's width, length and height
    against the canonical skull's at its size (the mean of the first two is 1)."""

    rotation: np.ndarray
    centre: np.ndarray
    size_mm: float
    residual_mm: float
    source: str
    proportions: np.ndarray = field(default_factory=lambda: np.ones(3))

    def rotation_deg(self) -> list[float]:
        """The head's rotation from the header's axes as x-y-z Euler angles in degrees."""
        return [round(float(a), 2) for a in Rotation.from_matrix(self.rotation).as_euler("xyz", degrees=True)]

    def summary(self) -> dict:
        return {"frame": self.source, "rotation_deg": self.rotation_deg(), "frame_residual_mm": round(self.residual_mm, 3),
                "head_size_mm": round(self.size_mm, 1), "head_scale": round(self.size_mm / REFERENCE_SIZE_MM, 4),
                "head_proportions": [round(float(p), 4) for p in self.proportions]}


class SkullSurface:
    """The boundary voxels of a skull ``mask (X, Y, Z)`` on a grid coarsened to about ``POINT_SPACING_MM``
    (``points`` (N, 3) world mm, at most ``MAX_POINTS`` drawn with ``seed``) and the distance (mm) from any
    world point to that boundary (:meth:`distance`, from a Euclidean distance transform, so that many
    candidate planes are scored at the cost of one interpolation each)."""

    def __init__(self, mask: np.ndarray, affine: np.ndarray, seed: int = 0) -> None:
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        step = np.maximum(1, np.round(POINT_SPACING_MM / spacing)).astype(int)
        coarse = np.asarray(mask, bool)[:: step[0], :: step[1], :: step[2]]
        # the distance map only needs the skull's box and the capped distance around it
        pad = int(np.ceil(SCORE_CAP_MM / (spacing * step).min())) + 1
        found = np.argwhere(coarse)
        lo = np.maximum(found.min(axis=0) - pad, 0) if len(found) else np.zeros(3, int)
        hi = found.max(axis=0) + pad + 1 if len(found) else np.zeros(3, int)
        coarse = np.pad(coarse[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], 1)  # the border is never bone
        boundary = coarse & ~ndimage.binary_erosion(coarse)
        self.grid_affine = affine.copy()
        self.grid_affine[:3, :3] = affine[:3, :3] * step
        self.grid_affine[:3, 3] = _apply(affine, (lo - 1) * step)
        self.to_grid = np.linalg.inv(self.grid_affine)
        self.edt = ndimage.distance_transform_edt(~boundary, sampling=spacing * step) if boundary.any() else None
        points = _apply(self.grid_affine, np.argwhere(boundary).astype(np.float64))
        # sorted by world position, so that the draw does not depend on how the file orders its axes
        points = points[np.lexsort(np.round(points, 3).T[::-1])]
        if len(points) > MAX_POINTS:
            points = points[np.sort(np.random.default_rng(seed).choice(len(points), MAX_POINTS, replace=False))]
        self.points = points

    def distance(self, points: np.ndarray) -> np.ndarray:
        """Distance (mm) from world points (..., 3) to the skull's boundary, capped at ``SCORE_CAP_MM``."""
        return self.grid_distance(_apply(self.to_grid, points.reshape(-1, 3)).reshape(points.shape))

    def grid_distance(self, coords: np.ndarray) -> np.ndarray:
        """:meth:`distance` of points (..., 3) given in the distance map's voxel coordinates."""
        flat = coords.reshape(-1, 3).T
        d = ndimage.map_coordinates(self.edt, flat, order=1, mode="constant", cval=SCORE_CAP_MM)
        return np.minimum(d, SCORE_CAP_MM).reshape(coords.shape[:-1])


def _reflection(normal: np.ndarray, offset: float) -> np.ndarray:
    """4x4 reflection across the plane n.x = offset."""
    m = np.eye(4)
    m[:3, :3] -= 2.0 * np.outer(normal, normal)
    m[:3, 3] = 2.0 * offset * normal
    return m


def _apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ m[:3, :3].T + m[:3, 3]


def _plane_scores(surface: SkullSurface, probe: np.ndarray, normals: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Mean capped distance of the ``probe`` points (P, 3) mirrored across each plane n_c.x = o_co to the
    skull, for ``normals (C, 3)`` and ``offsets (C, O)``: (C, O). Computed in the distance map's voxel
    coordinates: mirrored = p + shift n there as in the world."""
    shift = 2.0 * (offsets[None] - (probe @ normals.T)[:, :, None])  # (P, C, O)
    probe_grid = _apply(surface.to_grid, probe).astype(np.float32)
    normals_grid = (normals @ surface.to_grid[:3, :3].T).astype(np.float32)
    mirrored = probe_grid[:, None, None, :] + shift[..., None].astype(np.float32) * normals_grid[None, :, None, :]
    return surface.grid_distance(mirrored).mean(axis=0)


def _around(normal: np.ndarray, max_deg: float, step_deg: float) -> np.ndarray:
    """Unit vectors tilted from ``normal`` by up to ``max_deg`` on a grid of ``step_deg`` (C, 3)."""
    helper = np.eye(3)[int(np.argmin(np.abs(normal)))]
    u = np.cross(normal, helper)
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    tilts = np.radians(np.arange(-max_deg, max_deg + 1e-9, step_deg))
    a, b = np.meshgrid(tilts, tilts, indexing="ij")
    out = normal + np.tan(a.reshape(-1, 1)) * u + np.tan(b.reshape(-1, 1)) * v
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _best_plane(surface: SkullSurface, probe: np.ndarray, normals: np.ndarray, centres: np.ndarray,
                deltas: np.ndarray) -> tuple[np.ndarray, float]:
    """The best-scoring plane among ``normals (C, 3)`` x offsets ``n.centre + deltas`` (:func:`_plane_scores`)."""
    offsets = (normals @ centres)[:, None] + deltas[None, :]
    scores = _plane_scores(surface, probe, normals, offsets)
    c, o = np.unravel_index(int(np.argmin(scores)), scores.shape)
    return normals[c], float(offsets[c, o])


def _distinct_minima(normals: np.ndarray, scores: np.ndarray, count: int, separation_deg: float) -> np.ndarray:
    """Indices of the ``count`` best-scoring ``normals (C, 3)`` (``scores (C,)``, lower is better), each at least
    ``separation_deg`` from every better one kept."""
    kept: list[int] = []
    cos_sep = np.cos(np.radians(separation_deg))
    for i in np.argsort(scores):
        if all(abs(normals[i] @ normals[k]) < cos_sep for k in kept):
            kept.append(int(i))
            if len(kept) == count:
                break
    return np.array(kept)


def _fit_plane(surface: SkullSurface, probe: np.ndarray, normal: np.ndarray, offset: float,
               lateral: np.ndarray) -> tuple[np.ndarray, float, float]:
    """A coarse plane refined: a finer grid around it, then rigid ICP of the mirror image onto the skull (Open3D)
    from there; the plane is read off the fitted reflection. Returns ``(normal, offset, median residual mm)``."""
    points = surface.points
    normal, offset = _best_plane(surface, probe, _around(normal, 4.0, 1.0), normal * offset, np.arange(-3.0, 3.1, 1.0))
    source, target = o3d.geometry.PointCloud(), o3d.geometry.PointCloud()
    target.points = o3d.utility.Vector3dVector(points)
    reflection = _reflection(normal, offset)
    source.points = o3d.utility.Vector3dVector(_apply(reflection, points[:: max(1, len(points) // ICP_POINTS)]))
    fit = o3d.pipelines.registration.registration_icp(
        source, target, ICP_DISTANCE_MM, np.eye(4), o3d.pipelines.registration.TransformationEstimationPointToPoint(),
        o3d.pipelines.registration.ICPConvergenceCriteria(max_iteration=30))
    mirror = fit.transformation @ reflection  # improper: its -1 eigenvector is the plane's normal
    values, vectors = np.linalg.eig(mirror[:3, :3])
    normal = np.real(vectors[:, int(np.argmin(np.abs(values + 1.0)))])
    normal = normal * np.sign(normal @ lateral) / np.linalg.norm(normal)
    offset = float(np.mean((points + _apply(mirror, points)) @ normal) / 2.0)  # midpoints lie on the plane
    residual = float(np.median(surface.distance(_apply(_reflection(normal, offset), points))))
    return normal, offset, residual


def symmetry_plane(surface: SkullSurface, lateral: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The mid-sagittal plane of a skull: ``(normal (3,), offset, median residual mm)``, normal within
    ``SEARCH_DEG`` of ``lateral`` and on its side.

    A coarse grid search scores each plane by how close the mirrored surface points come to the skull (capped at
    ``SCORE_CAP_MM``, so the hole's unmatched points do not decide: a vault is nearly a dome, and the plane's
    roll changes little else; offsets are searched because a defect moves the centroid off the plane). The
    ``PLANE_CANDIDATES`` best distinct normals are each refined (:func:`_fit_plane`) and the plane whose mirror
    image lies closest to the skull by the median, which the hole cannot move, wins.
    """
    points = surface.points
    probe = points[:: max(1, len(points) // PROBE_POINTS)]
    normals = sphere_directions(3000)  # about 4 degrees apart
    normals = normals[normals @ lateral >= np.cos(np.radians(SEARCH_DEG))]
    offsets = (normals @ points.mean(axis=0))[:, None] + SEARCH_OFFSETS_MM[None, :]
    scores = _plane_scores(surface, probe, normals, offsets)
    fits = [_fit_plane(surface, probe, normals[c], float(offsets[c, int(np.argmin(scores[c]))]), lateral)
            for c in _distinct_minima(normals, scores.min(axis=1), PLANE_CANDIDATES, CANDIDATE_SEPARATION_DEG)]
    return min(fits, key=lambda fit: fit[2])


def estimate_frame(mask: np.ndarray, affine: np.ndarray, seed: int = 0) -> HeadFrame:
    """The :class:`HeadFrame` of a skull ``mask (X, Y, Z)`` with its 4x4 voxel-to-world ``affine`` (RAS world
    axes; they only pick the axes' signs and where the plane search starts). Falls back to the header's axes
    (``source`` "header") for a fragment, a skull that does not match its mirror image, or bone that covers
    too little of the canonical skull."""
    affine = np.asarray(affine, dtype=np.float64)
    surface = SkullSurface(mask, affine, seed)
    points = surface.points
    header = HeadFrame(np.eye(3), _box_centre(points, np.eye(3)) if len(points) else affine[:3, 3],
                       REFERENCE_SIZE_MM, float("nan"), "header")
    if len(points) < MIN_POINTS:
        logger.warning("head frame: only %d surface points (a fragment?), using the header's axes", len(points))
        return header
    lateral, anterior = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    normal, offset, residual = symmetry_plane(surface, lateral)
    if residual > MAX_RESIDUAL_MM:
        logger.warning("head frame: the skull matches its mirror image only to %.1f mm (> %.1f), using the "
                       "header's axes", residual, MAX_RESIDUAL_MM)
        return replace(header, size_mm=_size(points, np.eye(3)), residual_mm=residual)
    both = np.concatenate([points, _apply(_reflection(normal, offset), points)])
    centred = both - both.mean(axis=0)
    in_plane = centred - np.outer(centred @ normal, normal)
    values, vectors = np.linalg.eigh(in_plane.T @ in_plane)
    long_axis = vectors[:, -1] * np.sign(vectors[:, -1] @ anterior)
    rotation = np.stack([normal, long_axis, np.cross(normal, long_axis)], axis=1)
    size = _size(both, rotation)
    if not MIN_SCALE <= size / REFERENCE_SIZE_MM <= MAX_SCALE:
        logger.warning("head frame: the bone spans %.0f mm, not a whole skull (%.0f-%.0f mm), using the header's "
                       "axes", size, MIN_SCALE * REFERENCE_SIZE_MM, MAX_SCALE * REFERENCE_SIZE_MM)
        return replace(header, residual_mm=residual)
    rotation, coverage, proportions = _fit_template(both, rotation, _box_centre(both, rotation), size)
    if coverage < MIN_COVERAGE:
        logger.warning("head frame: the bone and its mirror image cover only %.0f %% of the canonical skull (< %.0f "
                       "%%), using the header's axes", 100 * coverage, 100 * MIN_COVERAGE)
        return replace(header, residual_mm=residual)
    return HeadFrame(rotation, _box_centre(both, rotation), size, residual, "skull", proportions)


@functools.lru_cache(maxsize=1)
def canonical_skull() -> o3d.geometry.PointCloud:
    """The canonical skull's surface points (models/canonical_skull.npy: an upright training skull in its
    own frame, centred on its box and scaled to ``REFERENCE_SIZE_MM``; tools/pose_study.py template)."""
    cloud = o3d.geometry.PointCloud()
    cloud.points = o3d.utility.Vector3dVector(np.load(TEMPLATE).astype(np.float64))
    return cloud


def _rigid_icp(source: o3d.geometry.PointCloud, target: o3d.geometry.PointCloud, distance: float,
               transform: np.ndarray) -> np.ndarray:
    return o3d.pipelines.registration.registration_icp(
        source, target, distance, transform, o3d.pipelines.registration.TransformationEstimationPointToPoint(),
        o3d.pipelines.registration.ICPConvergenceCriteria(max_iteration=30)).transformation


def _fit_template(points: np.ndarray, rotation: np.ndarray, centre: np.ndarray,
                  size: float) -> tuple[np.ndarray, float, np.ndarray]:
    """Fit the skull's points (N, 3) world mm, in the frame ``rotation`` (3, 3) at ``centre`` and ``size``, onto
    the canonical skull: rigid ICP, then alternations of one scale per canonical axis (a straight-line fit per
    axis on the pairs within ``FIT_DISTANCE_MM``; Open3D's ICP scales only isotropically) and rigid ICP onto the
    canonical skull shrunk by it. Returns ``rotation`` with its front-back axis turned about its left-right axis
    to where the fit puts it (the principal axis alone tips with a large defect, up to 11 degrees on training
    skulls; the skull's profile does not), the coverage (share of the canonical skull within 8 mm of the fitted
    points) and the proportions (3,): the head's extent per axis against the canonical skull's, the mean of the
    first two set to 1 (the size measure holds the rest)."""
    local = (points[:: max(1, len(points) // ICP_POINTS)] - centre) @ rotation * (REFERENCE_SIZE_MM / size)
    source = o3d.geometry.PointCloud()
    source.points = o3d.utility.Vector3dVector(local)
    template = np.asarray(canonical_skull().points)
    tree = cKDTree(template)
    transform = np.eye(4)
    for distance in (20.0, FIT_DISTANCE_MM):  # mm: a coarse pass, then a tight one
        transform = _rigid_icp(source, canonical_skull(), distance, transform)
    gain, bias = np.ones(3), np.zeros(3)  # the fitted points are gain * (transform @ local) + bias
    for _ in range(PROPORTION_ROUNDS):
        aligned = _apply(transform, local)
        for _ in range(SCALE_STEPS):  # nearest-point pairs move the scale slowly: many cheap steps per rigid fit
            found, index = tree.query(aligned * gain + bias, distance_upper_bound=FIT_DISTANCE_MM)
            pairs = np.isfinite(found)
            if pairs.sum() < MIN_POINTS:  # too little bone near the canonical skull: the coverage guard decides
                break
            for axis in range(3):
                gain[axis], bias[axis] = np.polyfit(aligned[pairs, axis], template[index[pairs], axis], 1)
        shrunk = o3d.geometry.PointCloud()
        shrunk.points = o3d.utility.Vector3dVector((template - bias) / gain)
        transform = _rigid_icp(source, shrunk, FIT_DISTANCE_MM, transform)
    fitted = o3d.geometry.PointCloud()
    fitted.points = o3d.utility.Vector3dVector(_apply(transform, local) * gain + bias)
    coverage = o3d.pipelines.registration.evaluate_registration(canonical_skull(), fitted, 8.0, np.eye(4)).fitness
    anterior = rotation @ transform[:3, :3].T[:, 1]  # the canonical front-back axis, in world coordinates
    normal = rotation[:, 0]
    anterior = anterior - (anterior @ normal) * normal
    anterior /= np.linalg.norm(anterior)
    proportions = 1.0 / gain
    proportions = proportions / proportions[:2].mean()
    if np.any((proportions < MIN_PROPORTION) | (proportions > MAX_PROPORTION)):
        logger.warning("head frame: proportions (width, length, height) %s beyond %.2f-%.2f, clipped",
                       np.round(proportions, 3).tolist(), MIN_PROPORTION, MAX_PROPORTION)
        proportions = np.clip(proportions, MIN_PROPORTION, MAX_PROPORTION)
    return np.stack([normal, anterior, np.cross(normal, anterior)], axis=1), float(coverage), proportions


def _box_centre(points: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """World position of the centre of the points' (1st-99th percentile) box along the frame's axes."""
    local = points @ rotation
    return rotation @ ((np.percentile(local, 1, axis=0) + np.percentile(local, 99, axis=0)) / 2.0)


def _size(points: np.ndarray, rotation: np.ndarray) -> float:
    """Mean of the left-right and front-back (1st-99th percentile) extents of the points in the frame."""
    local = points @ rotation[:, :2]
    return float(np.mean(np.percentile(local, 99, axis=0) - np.percentile(local, 1, axis=0)))


def canonical_affine(frame: HeadFrame, side: int, spacing_mm: float) -> np.ndarray:
    """4x4 voxel-to-world affine of the canonical cube: ``side``^3 voxels along the frame's axes, the
    frame's centre in the middle, voxels of ``spacing_mm`` scaled by the head's size and proportions."""
    voxel = spacing_mm * frame.size_mm / REFERENCE_SIZE_MM * np.asarray(frame.proportions)
    affine = np.eye(4)
    affine[:3, :3] = frame.rotation * voxel
    affine[:3, 3] = frame.centre - affine[:3, :3] @ np.full(3, (side - 1) / 2.0)
    return affine


def to_canonical(img: MetaTensor, affine: np.ndarray, side: int) -> MetaTensor:
    """Binary mask (1, X, Y, Z) -> uint8 (1, side, side, side) on the grid of ``affine`` (linear
    interpolation, threshold 0.5, as :func:`scripts.data.resample.to_original_grid` on the way back)."""
    out = SpatialResample(mode="bilinear", padding_mode="zeros")(
        img.float(), dst_affine=torch.as_tensor(affine, dtype=torch.float64), spatial_size=(side,) * 3)
    out = (out >= 0.5).to(torch.uint8)
    out.affine = torch.as_tensor(affine, dtype=torch.float64)
    return out


class CanonicalFramed(MapTransform):
    """A skull mask ``keys`` (1, X, Y, Z) with its affine -> the mask in its canonical cube
    (1, s, s, s), s = ``grid`` + 2 ``margin``: upright, centred, at the training size
    (:func:`estimate_frame`); the frame's :meth:`HeadFrame.summary` goes to ``frame_key`` and the cube's
    side to ``side_key`` (as :class:`scripts.data.cube.PadToCubed` sets it for the training transforms that
    read it). The frame comes from the first key; all keys are resampled into it."""

    def __init__(self, keys: KeysCollection, grid: int = 128, spacing_mm: float = 1.6, margin: int = 8,
                 seed: int = 0, frame_key: str = "frame", side_key: str = "cube_side") -> None:
        super().__init__(keys)
        if grid < 8 or spacing_mm <= 0 or margin < 0:
            raise ValueError(f"CanonicalFramed: grid >= 8, spacing_mm > 0 and margin >= 0, got {grid}, "
                             f"{spacing_mm}, {margin}")
        self.side, self.spacing_mm, self.seed = int(grid) + 2 * int(margin), float(spacing_mm), int(seed)
        self.frame_key, self.side_key = frame_key, side_key

    def __call__(self, data: Mapping[Hashable, MetaTensor]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        first, started = d[keys[0]], time.perf_counter()
        frame = estimate_frame(np.asarray(first[0]) > 0, np.asarray(first.affine, dtype=np.float64), self.seed)
        affine = canonical_affine(frame, self.side, self.spacing_mm)
        for key in keys:
            d[key] = to_canonical(d[key], affine, self.side)
        d[self.frame_key] = {**frame.summary(), "seconds": time.perf_counter() - started}
        d[self.side_key] = self.side
        return d
