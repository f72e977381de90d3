"""Implant masks from voxelizer output: complete - defective, post-processing, ensemble statistics.

Volumes are (X, Y, Z) numpy arrays (torch tensors and channel-first (1, X, Y, Z) arrays are accepted);
masks come back as bool (X, Y, Z). Point coordinates are voxel indices (i, j, k), float (M, 3).

Two ways to turn K ensemble members into one implant:

* reference order (pfriedri/pcdiff-implant): ``complete_from_indicator`` per member ->
  ``combine_completes`` (majority vote on the complete skulls) -> ``implant_from_complete``
  (subtract the defective skull, keep voxels near the generated points, clean);
* per-member order: ``postprocess_member`` per member -> ``ensemble_mean_and_variance`` on the K
  cleaned implants, which also gives the voxel-wise probability and variance (uncertainty) maps.

``postprocess_ensemble`` does both, as the inference pipeline uses them: the reference order for the
ensemble implant, the per-member order for the members and the uncertainty maps.

Morphology follows the reference post-processing. Its DIPlib 3x3x3 structuring element has DIPlib's
default "elliptic" shape, a digital ball of diameter 3, which we take as the 18-connected ``BALL3``
below. Opening and closing are idempotent, so the reference's applying each twice equals doing it once.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy
from scipy import ndimage
from scipy.spatial import cKDTree

from scripts.data.resample import to_original_grid
from scripts.io import mask3d, mask_spacing, volume3d

__all__ = [
    "BALL3",
    "complete_from_indicator",
    "raw_implant",
    "keep_near_points",
    "binary_open",
    "largest_component",
    "median_smooth",
    "binary_close",
    "fill_holes",
    "clean_implant",
    "implant_from_complete",
    "postprocess_member",
    "postprocess_ensemble",
    "majority_vote",
    "expected_wrong",
    "combine_completes",
    "ensemble_mean_and_variance",
    "require_implant",
    "open_fraction",
    "require_opening",
    "ImplantToInputGridd",
    "RequireImplantd",
]

BALL3 = ndimage.generate_binary_structure(3, 2)  # 3x3x3 cube without its 8 corners


def _stack(masks, name: str) -> np.ndarray:
    """(K, X, Y, Z) array or a sequence of K volumes -> bool (K, X, Y, Z), K >= 1."""
    if isinstance(masks, (list, tuple)):
        if not masks:
            raise ValueError(f"{name}: got an empty sequence, expected K >= 1 volumes.")
        masks = np.stack([mask3d(m, f"{name}[{i}]") for i, m in enumerate(masks)])
    a = convert_to_numpy(masks)
    a = a if a.dtype == bool else a != 0
    if a.ndim != 4 or a.shape[0] == 0:
        raise ValueError(f"{name}: expected K >= 1 volumes stacked as (K, X, Y, Z), got shape {tuple(a.shape)}.")
    return a


def complete_from_indicator(indicator, dilate: int = 1) -> np.ndarray:
    """Complete-skull mask from a DPSR indicator grid (inside <= 0 < outside), dilated ``dilate`` times.

    Args:
        indicator: float (X, Y, Z) indicator on the skull's voxel grid.
        dilate: number of binary dilations with ``BALL3`` (reference: 1; 0 disables).
    """
    grid = volume3d(indicator, "indicator")
    if not np.issubdtype(grid.dtype, np.floating):
        raise ValueError(f"indicator: expected a float indicator grid, got dtype {grid.dtype}.")
    if dilate < 0:
        raise ValueError(f"dilate: must be >= 0, got {dilate}.")
    complete = grid <= 0
    return ndimage.binary_dilation(complete, BALL3, iterations=dilate) if dilate else complete


def raw_implant(complete, defective) -> np.ndarray:
    """Implant before cleaning: complete & ~defective, bool (X, Y, Z)."""
    c, d = mask3d(complete, "complete"), mask3d(defective, "defective")
    if c.shape != d.shape:
        raise ValueError(f"complete {c.shape} and defective {d.shape} masks differ in shape.")
    return c & ~d


def keep_near_points(mask, points_vox, max_distance_vox: float) -> np.ndarray:
    """Drop voxels farther than ``max_distance_vox`` (Euclidean, voxel units) from every point.

    A KD-tree on the M points queried with the mask's foreground voxels is exact for the float point
    positions and costs O(V log M) in the V foreground voxels, whereas an EDT to the voxelised points
    rounds the points to voxel centres and costs O(volume) (about 1 GB of float64 at 512^3).

    Args:
        mask: bool (X, Y, Z).
        points_vox: float (M, 3) voxel coordinates (i, j, k) of the generated implant points, M >= 1.
        max_distance_vox: distance threshold in voxels, > 0.
    """
    m = mask3d(mask, "mask")
    pts = np.asarray(convert_to_numpy(points_vox), dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0 or not np.all(np.isfinite(pts)):
        raise ValueError(f"points_vox: expected finite (M, 3) voxel coordinates with M >= 1, got shape {pts.shape}.")
    if not max_distance_vox > 0:
        raise ValueError(f"max_distance_vox: must be > 0, got {max_distance_vox}.")
    idx = np.argwhere(m)
    if len(idx) == 0:
        return m
    # the bound is exclusive in cKDTree; nudge it so a voxel exactly at max_distance_vox is kept
    dist, _ = cKDTree(pts).query(idx, distance_upper_bound=np.nextafter(max_distance_vox, np.inf))
    out = np.zeros_like(m)
    near = idx[dist <= max_distance_vox]
    out[near[:, 0], near[:, 1], near[:, 2]] = True
    return out


def binary_open(mask, iterations: int = 1) -> np.ndarray:
    """Binary opening with ``BALL3``: removes spurs, bridges and specks thinner than 3 voxels."""
    m = mask3d(mask, "mask")
    return ndimage.binary_opening(m, BALL3, iterations=iterations) if iterations else m


def largest_component(mask) -> np.ndarray:
    """Keep the largest 26-connected component (bool (X, Y, Z)). scipy's label with int32 labels: MONAI's
    get_largest_connected_component_mask labels with skimage in int64, twice the memory on a full-size scan."""
    labels, count = ndimage.label(mask3d(mask, "mask"), structure=np.ones((3, 3, 3), bool), output=np.int32)
    if count == 0:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def median_smooth(mask, size: int = 3) -> np.ndarray:
    """size^3 median filter (on a binary mask: majority of the cube); removes salt noise and smooths."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"median size: must be a positive odd integer, got {size}.")
    m = mask3d(mask, "mask")
    return ndimage.median_filter(m.view(np.uint8), size=size).astype(bool) if size > 1 else m


def binary_close(mask, iterations: int = 1) -> np.ndarray:
    """Binary closing with ``BALL3``: closes gaps and cracks about 1-2 voxels wide.

    scipy erodes from a zero border, which would cut mask voxels on the volume edge; padding by the
    reach of the operation avoids that.
    """
    m = mask3d(mask, "mask")
    if not iterations:
        return m
    padded = np.pad(m, iterations)
    inner = (slice(iterations, -iterations),) * 3
    return ndimage.binary_closing(padded, BALL3, iterations=iterations)[inner]


def fill_holes(mask) -> np.ndarray:
    """Fill enclosed cavities (background not 6-connected to the volume border)."""
    return ndimage.binary_fill_holes(mask3d(mask, "mask"))


def _crop(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` grown by ``margin`` voxels (clipped to the volume), None if empty."""
    box = ndimage.find_objects(mask.view(np.uint8))
    if not box:
        return None
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box[0], mask.shape))


def clean_implant(mask, opening: int = 1, median: int = 3, closing: int = 1) -> np.ndarray:
    """Reference clean-up: opening, largest component, median, closing, hole filling, largest component.

    The chain runs on the mask's bounding box plus a zero margin wider than every step's reach, which
    gives the full-volume result at a fraction of the cost (an implant is a few % of a 512^3 grid).

    Args:
        mask: bool (X, Y, Z) raw implant.
        opening, closing: iterations of the BALL3 opening / closing (0 skips the step).
        median: edge length of the median cube (1 skips the step).
    Returns:
        bool (X, Y, Z); empty if the input (or what the opening leaves) is empty.
    """
    m = mask3d(mask, "mask")
    box = _crop(m, 2 * (opening + closing) + median + 2)
    out = np.zeros_like(m)
    if box is None:
        return out
    sub = binary_open(m[box], opening)
    if sub.any():
        sub = largest_component(sub)
        sub = median_smooth(sub, median)
        sub = binary_close(sub, closing)
        sub = largest_component(fill_holes(sub))
    out[box] = sub
    return out


def implant_from_complete(
    complete,
    defective,
    implant_points_vox=None,
    max_distance_vox: float = 10.0,
    opening: int = 1,
    median: int = 3,
    closing: int = 1,
) -> np.ndarray:
    """complete & ~defective, optionally restricted to voxels near the generated points, then cleaned.

    Args:
        complete, defective: masks (X, Y, Z) on the same grid.
        implant_points_vox: float (M, 3) generated (implant) points in voxel coordinates, or None to
            skip the distance filter.
        max_distance_vox: distance filter threshold in voxels. The default suits SkullBreak at 0.4 mm
            (implants are about 15 voxels thick, so inner voxels lie up to ~8 voxels from the surface points).
        opening, median, closing: see :func:`clean_implant`.
    Returns:
        bool (X, Y, Z) implant.
    """
    implant = raw_implant(complete, defective)
    if implant_points_vox is not None:
        implant = keep_near_points(implant, implant_points_vox, max_distance_vox)
    return clean_implant(implant, opening, median, closing)


def postprocess_member(indicator, defective, implant_points_vox=None, dilate: int = 1, **kwargs) -> np.ndarray:
    """One ensemble member: indicator (X, Y, Z) float -> cleaned implant bool (X, Y, Z).

    ``kwargs`` go to :func:`implant_from_complete` (max_distance_vox, opening, median, closing).
    """
    return implant_from_complete(complete_from_indicator(indicator, dilate), defective, implant_points_vox, **kwargs)


def _votes(stack: np.ndarray) -> tuple[np.ndarray, int]:
    """bool (K, X, Y, Z) -> (member count per voxel int32 (X, Y, Z), majority threshold ceil(K / 2))."""
    return stack.sum(axis=0, dtype=np.int32), -(-stack.shape[0] // 2)


def majority_vote(masks) -> np.ndarray:
    """Voxel-wise vote of K masks (K, X, Y, Z): foreground where at least ceil(K / 2) members agree.

    For odd K this is a strict majority. For even K a tie (exactly K / 2 votes) counts as foreground,
    as in the reference (``completes >= ceil(K / 2)``): an implant should rather cover the defect
    than leave a gap.
    """
    votes, threshold = _votes(_stack(masks, "masks"))
    return votes >= threshold


def combine_completes(completes) -> np.ndarray:
    """Reference ensembling: majority vote (see :func:`majority_vote`) on K complete-skull masks."""
    return majority_vote(completes)


def ensemble_mean_and_variance(implants) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ensemble statistics of K binary implants (K, X, Y, Z).

    Returns:
        mean_implant: bool (X, Y, Z), the majority vote.
        probability: float32 (X, Y, Z), fraction p of members that contain the voxel.
        variance: float32 (X, Y, Z), variance p (1 - p) of the binary members (0 .. 0.25).
    """
    stack = _stack(implants, "implants")
    votes, threshold = _votes(stack)
    probability = votes.astype(np.float32) / stack.shape[0]
    return votes >= threshold, probability, probability * (1 - probability)


def postprocess_ensemble(indicators, defective, implant_points_vox, dilate: int = 1,
                         max_distance_vox: float = 10.0) -> dict[str, np.ndarray | None]:
    """K members' indicators -> their implants and the ensemble implant and statistics.

    Args:
        indicators: float (K, X, Y, Z) DPSR indicator grids (inside <= 0).
        defective: bool (X, Y, Z).
        implant_points_vox: float (K, M, 3) each member's generated points, voxel coordinates.
        dilate, max_distance_vox: see :func:`complete_from_indicator` / :func:`implant_from_complete`.
    Returns:
        "completes", "implants": bool (K, X, Y, Z); "implant_mean": bool (X, Y, Z) in the reference
        order (majority vote on the complete skulls, then subtract and clean, filtered by all members'
        points); "probability", "variance": float32 (X, Y, Z) of the K cleaned implants. For K = 1 the
        mean is the member itself and the two maps are None (nothing to vote on, no variance).
    """
    points = np.asarray(convert_to_numpy(implant_points_vox))
    completes = np.stack([complete_from_indicator(g, dilate) for g in indicators])
    implants = np.stack([implant_from_complete(c, defective, p, max_distance_vox) for c, p in zip(completes, points)])
    if len(implants) == 1:
        return {"completes": completes, "implants": implants, "implant_mean": implants[0], "probability": None,
                "variance": None}
    _, probability, variance = ensemble_mean_and_variance(implants)
    mean = implant_from_complete(combine_completes(completes), defective, points.reshape(-1, 3), max_distance_vox)
    return {"completes": completes, "implants": implants, "implant_mean": mean, "probability": probability,
            "variance": variance}


def require_implant(implant, min_voxels: int = 1, name: str = "implant") -> int:
    """Return the implant's voxel count; raise ValueError if it has fewer than ``min_voxels`` voxels."""
    n = int(np.count_nonzero(volume3d(implant, name)))
    if n < min_voxels:
        raise ValueError(
            f"{name}: no defect found, the implant is empty or too small ({n} voxels < min_voxels={min_voxels}); "
            "the completed skull adds nothing to the defective skull (is the input skull complete?)."
        )
    return n


def open_fraction(implant, defective, spacing, band_mm: float = 15.0, max_voxels: int = 20000) -> float:
    """The fraction of the implant that lies over an opening of the defective skull, seen from its centre.

    For each implant voxel, the ray from the skull's centre of mass through the voxel is searched within
    ``band_mm`` on either side of it: if it meets bone, the voxel lies over or under existing bone. An
    implant that fills a defect covers the opening (study implants: 95-100 % open, the rest is the rim);
    a piece added beside intact bone, as on a complete skull, is 0 % open. Written by hand: no library
    tests whether a shell is missing under a region. Uses at most ``max_voxels`` implant voxels (an even
    stride, so the result is deterministic).

    Args:
        implant, defective: bool (X, Y, Z) on the same grid.
        spacing: (3,) voxel size in mm.
    Returns:
        float in [0, 1]; 0 for an empty implant, 1 if there is no bone at all.
    """
    implant, defective = volume3d(implant, "implant") > 0, volume3d(defective, "defective") > 0
    boxes = ndimage.find_objects(implant.view(np.uint8))
    if not boxes:
        return 0.0
    box = boxes[0]
    if not defective.any():
        return 1.0
    voxels = np.argwhere(implant[box]) + [b.start for b in box]
    voxels = voxels[:: math.ceil(len(voxels) / max_voxels)]
    spacing = np.asarray(spacing, dtype=np.float64)
    # the centre of mass from the three marginal sums: ndimage.center_of_mass weighs every voxel (10x slower)
    counts = [defective.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64) for axis in range(3)]
    centre = np.array([np.dot(c, np.arange(len(c))) / c.sum() for c in counts])
    offset_mm = (voxels - centre) * spacing  # (M, 3)
    radius = np.linalg.norm(offset_mm, axis=1, keepdims=True)
    direction = offset_mm / np.maximum(radius, 1e-9)
    steps = np.arange(-band_mm, band_mm + 1e-9, 0.5 * spacing.min())  # (S,) mm along the ray
    along = centre + direction[:, None, :] * (radius[:, None, :] + steps[None, :, None]) / spacing  # (M, S, 3)
    index = np.rint(along).astype(np.int64)
    inside = np.all((index >= 0) & (index < np.asarray(defective.shape)), axis=2)
    index = np.clip(index, 0, np.asarray(defective.shape) - 1)
    bone = defective[index[..., 0], index[..., 1], index[..., 2]] & inside
    return float(1.0 - bone.any(axis=1).mean())


def require_opening(implant, defective, spacing, min_open_fraction: float = 0.5, name: str = "implant") -> float:
    """Return :func:`open_fraction`; raise ValueError ("no defect found") if less than
    ``min_open_fraction`` of the implant lies over an opening of the defective skull. Unlike the volume
    guard this does not depend on how little the denoiser adds to a complete skull."""
    fraction = open_fraction(implant, defective, spacing)
    if fraction < min_open_fraction:
        raise ValueError(
            f"{name}: no defect found, only {100 * fraction:.0f} % of the implant lies over an opening of the "
            f"skull (< min_open_fraction={min_open_fraction:g}); the rest lies along intact bone. Is the input "
            "skull complete? If it has a defect, the model did not find it: check the preview, or set "
            "min_open_fraction 0 to keep this implant."
        )
    return fraction


def _to_input_grid(volume: np.ndarray, cube: MetaTensor, img: MetaTensor, binary: bool) -> np.ndarray:
    """A model-grid volume (s, s, s) on the canonical ``cube``'s grid -> the input's exact grid (X, Y, Z) in
    one resampling (:func:`~scripts.data.resample.to_original_grid`); for a binary volume the skull's voxels
    (``img`` > 0) are left out: bool if binary else float32."""
    data = MetaTensor(torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None], affine=cube.affine)
    out = np.asarray(to_original_grid(data, img, binary, exclude=img if binary else None)[0])
    return out > 0 if binary else out


class ImplantToInputGridd(MapTransform):
    """The generator's result (``keys``: :class:`~scripts.generator.ImplantGenerator` output on the canonical
    cube ``cube_key``, :class:`~scripts.frame.CanonicalFramed`) -> the input's exact grid (``reference_key``,
    the input skull mask), without the skull's voxels: ``implant`` (the single member, or the ensemble's
    mean implant), and for an ensemble ``implant_members``, ``implant_probability`` (float32, resampled) and
    ``implant_variance`` (its p (1 - p)) and ``expected_wrong_ml`` (:func:`expected_wrong_ml` on the model grid)."""

    def __init__(self, keys: KeysCollection = "pred", cube_key: str = "image", reference_key: str = "skull") -> None:
        super().__init__(keys)
        self.cube_key, self.reference_key = cube_key, reference_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        cube, img = d[self.cube_key], d[self.reference_key]
        for key in self.key_iterator(d):
            pred = d[key]
            single = len(pred["implants"]) == 1
            d["implant"] = _to_input_grid(pred["implants"][0] if single else pred["implant_mean"], cube, img, True)
            d["implant_members"] = None if single else [_to_input_grid(m, cube, img, True) for m in pred["implants"]]
            d["implant_probability"] = None if single else _to_input_grid(pred["probability"], cube, img, False)
            d["implant_variance"] = None if single else d["implant_probability"] * (1.0 - d["implant_probability"])
            d["expected_wrong_ml"] = None if single else expected_wrong_ml(
                pred["probability"], pred["implant_mean"], float(np.prod(mask_spacing(cube))) / 1000.0)
        return d


def expected_wrong(probability: np.ndarray, implant: np.ndarray) -> np.ndarray:
    """Each voxel's chance that the ensemble's ``implant`` (bool) is wrong there if it is bone with the members'
    ``probability``: 1 - p inside the implant, p outside (same shapes)."""
    p = np.asarray(probability, dtype=np.float64)
    return np.where(np.asarray(implant, dtype=bool), 1.0 - p, p)


def expected_wrong_ml(probability: np.ndarray, implant: np.ndarray, voxel_ml: float) -> float:
    """The volume (ml) the ensemble's ``implant`` gets wrong in expectation (:func:`expected_wrong`), voxels of
    ``voxel_ml`` each."""
    return float(expected_wrong(probability, implant).sum() * voxel_ml)


class RequireImplantd(MapTransform):
    """Stops a case without a defect (ValueError "no defect found", naming the ``name_key`` file): an
    implant in ``keys`` smaller than ``min_implant_ml`` (:func:`require_implant`, in the reference mask's
    voxel spacing), or one of which less than ``min_open_fraction`` lies over an opening of the defective
    skull ``reference_key`` (:func:`require_opening`; 0 turns it off). Sets ``<key>_voxels`` and
    ``<key>_open_fraction``."""

    def __init__(self, keys: KeysCollection = "implant", reference_key: str = "skull", min_implant_ml: float = 2.0,
                 min_open_fraction: float = 0.5, name_key: str = "input") -> None:
        super().__init__(keys)
        self.reference_key, self.name_key = reference_key, name_key
        self.min_implant_ml, self.min_open_fraction = float(min_implant_ml), float(min_open_fraction)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        img = d[self.reference_key]
        defective, spacing, name = np.asarray(img[0]) > 0, mask_spacing(img), str(Path(d[self.name_key]))
        min_voxels = math.ceil(self.min_implant_ml * 1000.0 / float(np.prod(spacing)))
        for key in self.key_iterator(d):
            d[f"{key}_voxels"] = require_implant(d[key], min_voxels, name=name)
            d[f"{key}_open_fraction"] = require_opening(d[key], defective, spacing, self.min_open_fraction, name=name)
        return d
