"""Point-cloud transforms: mask -> surface points -> sampled, normalised inputs (and the inverse).

Conventions: point clouds are float32 ``(N, 3)`` (or ``(B, N, 3)`` once collated); voxel
coordinates are in array index order ``(i, j, k)``; physical coordinates (mm) come from the 4x4
MONAI (RAS) affine. Normalisation uses the bounding box of the condition (defective-skull) points
only: ``centre = bbox centre``, ``scale = longest bbox extent / 6``, so points land in about
``[-3, 3]``, identically in training and inference.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, Randomizable
from monai.transforms.utils import apply_affine_to_points
from monai.utils import convert_to_dst_type, convert_to_numpy
from scipy.spatial import cKDTree
from skimage.measure import marching_cubes

__all__ = [
    "voxel_to_physical",
    "physical_to_voxel",
    "mask_to_surface_points",
    "normalization_params",
    "normalize_points",
    "denormalize_points",
    "SurfacePointsd",
    "mirror_over_openings",
    "MirrorPointsd",
    "SamplePointsd",
    "NormalizePointsd",
    "JitterPointsd",
]

_COORDS = ("voxel", "physical")


def _check_affine(affine) -> torch.Tensor:
    affine = torch.as_tensor(convert_to_numpy(affine, dtype=np.float64))
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be a 4x4 matrix, got shape {tuple(affine.shape)}")
    return affine


def voxel_to_physical(points, affine):
    """Map voxel index coordinates ``(..., N, 3)`` to physical (mm) coordinates with a 4x4 affine.

    Computed in float64 (on CPU); returns the input's type, shape and dtype.
    """
    return apply_affine_to_points(points.reshape(1, -1, 3), _check_affine(affine)).reshape(points.shape)


def physical_to_voxel(points, affine):
    """Exact inverse of :func:`voxel_to_physical` (uses the inverse of the 4x4 affine)."""
    return voxel_to_physical(points, torch.linalg.inv(_check_affine(affine)))


def mask_to_surface_points(
    mask,
    num_points: int,
    seed: int = 0,
    affine=None,
    coords: str = "voxel",
    init_factor: float = 5,
) -> np.ndarray:
    """Sample ``num_points`` well-spread points on the surface of a binary mask.

    Marching cubes (level 0.5) on the mask padded by one voxel, so surfaces cut by the volume
    border are closed, then Open3D Poisson-disk sampling (``init_factor * num_points`` uniform
    candidates thinned by sample elimination; a smaller ``init_factor`` is faster but less even).
    Open3D's global generator is seeded with ``seed``, which makes the result deterministic.

    Args:
        mask: ``(X, Y, Z)`` array or tensor; voxels > 0 are foreground.
        num_points: number of output points.
        seed: seed of Open3D's random generator.
        affine: 4x4 voxel-to-physical matrix, required when ``coords="physical"``.
        coords: ``"voxel"`` (array index order) or ``"physical"`` (mm, via ``affine``).
        init_factor: Open3D's candidate multiplier (its default is 5).

    Returns:
        float32 ``(num_points, 3)``.
    """
    mask = convert_to_numpy(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3-D (X, Y, Z), got shape {mask.shape}")
    if not mask.any():
        raise ValueError("mask is empty: no surface to sample")
    if int(num_points) < 1:
        raise ValueError(f"num_points must be a positive integer, got {num_points}")
    if coords not in _COORDS:
        raise ValueError(f"coords must be one of {_COORDS}, got {coords!r}")
    if coords == "physical" and affine is None:
        raise ValueError('coords="physical" needs an affine')

    # Imported here: only surface sampling needs Open3D, and the GPU image that tools/device_check.py
    # runs on has none (that check carries precomputed condition points instead).
    import open3d as o3d

    padded = np.pad(mask > 0, 1).astype(np.float32)
    verts, faces, _, _ = marching_cubes(padded, level=0.5)
    mesh = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector((verts - 1.0).astype(np.float64)),
        o3d.utility.Vector3iVector(faces.astype(np.int32)),
    )
    o3d.utility.random.seed(int(seed))
    pcd = mesh.sample_points_poisson_disk(int(num_points), init_factor=init_factor)
    points = np.asarray(pcd.points)
    if coords == "physical":
        points = voxel_to_physical(points, affine)
    return points.astype(np.float32)


def normalization_params(points):
    """Centre ``(..., 3)`` and scale ``(...)`` of points ``(..., N, 3)``.

    ``centre`` is the bounding-box centre and ``scale`` the longest bounding-box extent / 6, so
    ``normalize_points`` maps the points into ``[-3, 3]`` with the longest extent exactly 6.
    """
    xp = torch if isinstance(points, torch.Tensor) else np
    lo, hi = xp.amin(points, -2), xp.amax(points, -2)
    scale = xp.amax(hi - lo, -1) / 6.0
    if (scale <= 0).any():
        raise ValueError("cannot normalise: the points' bounding box has zero extent")
    return (lo + hi) / 2.0, scale


def normalize_points(points, center, scale):
    """``(points - center) / scale``; points ``(..., N, 3)``, center ``(..., 3)``, scale ``(...)``."""
    return (points - center[..., None, :]) / scale[..., None, None]


def denormalize_points(points, center, scale):
    """Inverse of :func:`normalize_points` (same shapes; works on collated batches too)."""
    return points * scale[..., None, None] + center[..., None, :]


class SurfacePointsd(MapTransform):
    """Mask keys -> surface points ``<key><postfix>``, float32 torch ``(N, 3)``.

    Accepts ``(1, X, Y, Z)`` MetaTensors (``LoadImaged`` + ``EnsureChannelFirstd``) or ``(X, Y, Z)``
    arrays; physical coordinates use the MetaTensor's affine. The transform is deterministic
    (Open3D is seeded with ``seed``), deliberately not ``Randomizable``: MONAI's
    ``CacheDataset``/``PersistentDataset`` then cache this expensive step, and per-epoch
    randomness comes from :class:`SamplePointsd`, as in the reference training.

    Args:
        keys: mask keys, e.g. ``("defective", "implant", "complete")``.
        num_points: points per key, an int or a ``{key: int}`` mapping.
        coords: ``"voxel"`` or ``"physical"``.
        seed: Open3D seed (same mask and seed -> identical points).
        init_factor: Poisson-disk candidate multiplier, see :func:`mask_to_surface_points`.
        postfix: output key suffix.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_points: int | Mapping[Hashable, int],
        coords: str = "voxel",
        seed: int = 0,
        init_factor: float = 5,
        postfix: str = "_points",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if coords not in _COORDS:
            raise ValueError(f"coords must be one of {_COORDS}, got {coords!r}")
        if isinstance(num_points, Mapping):
            missing = [k for k in self.keys if k not in num_points]
            if missing:
                raise ValueError(f"num_points has no entry for keys {missing}")
            self.num_points = dict(num_points)
        else:
            self.num_points = {k: num_points for k in self.keys}
        self.coords, self.seed, self.init_factor, self.postfix = coords, seed, init_factor, postfix

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = f"key {key!r}"
            if isinstance(img, MetaTensor):
                name += f" ({img.meta.get('filename_or_obj', 'no filename')})"
            if img.ndim == 4 and img.shape[0] != 1:
                raise ValueError(f"{name}: expected one channel (1, X, Y, Z), got shape {tuple(img.shape)}")
            affine = img.affine if isinstance(img, MetaTensor) else None
            if self.coords == "physical" and affine is None:
                raise ValueError(f'{name}: coords="physical" needs a MetaTensor with an affine')
            try:
                pts = mask_to_surface_points(
                    img[0] if img.ndim == 4 else img,
                    self.num_points[key],
                    seed=self.seed,
                    affine=affine,
                    coords=self.coords,
                    init_factor=self.init_factor,
                )
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from err
            d[f"{key}{self.postfix}"] = torch.from_numpy(pts)
        return d


# a mirrored point lies over an opening when no surface point is within this many of the surface's typical
# point spacings (median nearest-neighbour distance): mirrored intact bone lands within about one spacing
OPENING_SPACINGS = 2.0


def mirror_over_openings(points, side: int, min_points: int = 0):
    """The skull's mirror image where it falls on no bone: surface points ``(N, 3)`` in voxel coordinates of a
    canonical cube of ``side`` voxels (:mod:`scripts.frame`: the mid-sagittal plane is the cube's middle plane
    across axis 0) -> their mirror images farther than ``OPENING_SPACINGS`` spacings from every point,
    farthest first ``(M, 3)``; padded with the next farthest to at least ``min_points`` (at most N)."""
    pts = convert_to_numpy(points, dtype=np.float64)
    mirrored = pts.copy()
    mirrored[:, 0] = (side - 1) - mirrored[:, 0]
    tree = cKDTree(pts)
    spacing = float(np.median(tree.query(pts, k=2)[0][:, 1]))
    distance = tree.query(mirrored)[0]
    order = np.argsort(-distance, kind="stable")
    count = max(int((distance > OPENING_SPACINGS * spacing).sum()), min(int(min_points), len(pts)))
    return convert_to_dst_type(mirrored[order[:count]].astype(np.float32), points)[0]


class MirrorPointsd(MapTransform):
    """``keys`` (surface points in the canonical cube, (N, 3)) -> ``output_key``: their mirror images over the
    openings (:func:`mirror_over_openings`), at least ``min_points``; the cube's side is read from
    ``side_key`` (set by :class:`scripts.frame.CanonicalFramed`). Deterministic, so caching datasets keep it."""

    def __init__(self, keys: KeysCollection = "defective_points", output_key: str = "mirror_points",
                 side_key: str = "cube_side", min_points: int = 0) -> None:
        super().__init__(keys)
        self.output_key, self.side_key, self.min_points = output_key, side_key, int(min_points)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.side_key not in d:
            raise KeyError(f"MirrorPointsd needs the canonical cube's side in {self.side_key!r} (CanonicalFramed)")
        for key in self.key_iterator(d):
            d[self.output_key] = mirror_over_openings(d[key], int(d[self.side_key]), self.min_points)
        return d


class SamplePointsd(Randomizable, MapTransform):
    """Randomly draw the condition and target point sets of one training/inference sample.

    ``keys[0]`` (defective-skull points) -> ``output_keys[0]`` with ``num_condition`` points,
    ``keys[1]`` (implant points) -> ``output_keys[1]`` with ``num_target`` points. Draws are without
    replacement when the source has enough points, with replacement otherwise. Use
    ``allow_missing_keys=True`` at inference, where only the condition source exists.
    Paper sizes: 27,648 + 3,072. With ``num_mirror`` > 0 the condition's last ``num_mirror`` points are
    drawn from ``mirror_key`` (:class:`MirrorPointsd`) instead, as the ``small_mirror`` denoiser expects.
    """

    def __init__(
        self,
        keys: KeysCollection = ("defective_points", "implant_points"),
        num_condition: int = 27648,
        num_target: int = 3072,
        output_keys: Sequence[str] = ("condition", "target"),
        allow_missing_keys: bool = False,
        num_mirror: int = 0,
        mirror_key: str = "mirror_points",
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 1 <= len(self.keys) <= 2 or len(output_keys) != len(self.keys):
            raise ValueError(f"need 1 or 2 keys and as many output_keys, got {self.keys} -> {output_keys}")
        if not 0 <= num_mirror < num_condition:
            raise ValueError(f"need 0 <= num_mirror < num_condition, got {num_mirror}, {num_condition}")
        sizes = (num_condition - num_mirror, num_target)[: len(self.keys)]
        if min(sizes) < 1:
            raise ValueError(f"num_condition/num_target must be positive, got {sizes}")
        self.plan = dict(zip(self.keys, zip(output_keys, sizes)))
        if num_mirror:
            self.plan[mirror_key] = (output_keys[0], num_mirror)
        self._indices: dict[Hashable, np.ndarray] = {}

    def randomize(self, sources: Mapping[Hashable, int]) -> None:
        """Draw indices for each ``{key: number of available points}``."""
        self._indices = {}
        for key, n in sources.items():
            size = self.plan[key][1]
            if n < 1:
                raise ValueError(f"key {key!r} has no points to sample from")
            self._indices[key] = self.R.choice(n, size, replace=n < size)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d)) + [k for k in self.plan if k not in self.keys]
        missing = [k for k in keys if k not in d]
        if missing:
            raise KeyError(f"SamplePointsd: no {missing} in the data (MirrorPointsd makes the mirror points)")
        self.randomize({key: len(d[key]) for key in keys})
        drawn: dict[str, list] = {}
        for key in keys:
            drawn.setdefault(self.plan[key][0], []).append(d[key][self._indices[key]])
        for out, parts in drawn.items():
            d[out] = parts[0] if len(parts) == 1 else torch.cat([torch.as_tensor(p) for p in parts])
        return d


class NormalizePointsd(MapTransform, InvertibleTransform):
    """Normalise point keys with the bounding box of ``reference_key`` (see module docstring).

    The same centre/scale is applied to every key and stored as ``center_key`` ``(3,)`` and
    ``scale_key`` ``()``; these stored values are the trace that :meth:`inverse` uses, so
    ``Compose.inverse`` works on plain tensors and on collated batches.
    """

    def __init__(
        self,
        keys: KeysCollection = ("condition", "target"),
        reference_key: str = "condition",
        center_key: str = "norm_center",
        scale_key: str = "norm_scale",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key, self.center_key, self.scale_key = reference_key, center_key, scale_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.reference_key not in d:
            raise KeyError(f"reference_key {self.reference_key!r} not in data (keys: {list(d)})")
        center, scale = normalization_params(d[self.reference_key])
        for key in self.key_iterator(d):
            d[key] = normalize_points(d[key], center, scale)
        d[self.center_key], d[self.scale_key] = center, scale
        return d

    def inverse(self, data: Mapping) -> dict:
        """Denormalise the keys and remove the stored centre/scale, restoring the input dict."""
        d = dict(data)
        if self.center_key not in d or self.scale_key not in d:
            raise KeyError(f"cannot invert: {self.center_key!r}/{self.scale_key!r} missing from data")
        center, scale = d.pop(self.center_key), d.pop(self.scale_key)
        for key in self.key_iterator(d):
            d[key] = denormalize_points(d[key], center, scale)
        return d


class JitterPointsd(Randomizable, MapTransform):
    """Augment point sets: drop a random ``drop_fraction`` of points, add N(0, ``sigma``) noise.

    Point order of the kept points is preserved; ``sigma`` is in the points' own units. Each key
    gets its own draws.
    """

    def __init__(
        self,
        keys: KeysCollection,
        sigma: float = 0.0,
        drop_fraction: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if sigma < 0 or not 0 <= drop_fraction < 1:
            raise ValueError(f"need sigma >= 0 and 0 <= drop_fraction < 1, got {sigma}, {drop_fraction}")
        self.sigma, self.drop_fraction = sigma, drop_fraction
        self._draws: dict[Hashable, tuple[np.ndarray, np.ndarray]] = {}

    def randomize(self, sources: Mapping[Hashable, int]) -> None:
        """Draw (kept indices, noise) for each ``{key: number of points}``."""
        self._draws = {}
        for key, n in sources.items():
            keep = np.sort(self.R.choice(n, n - int(round(n * self.drop_fraction)), replace=False))
            self._draws[key] = keep, self.R.normal(0.0, self.sigma, (len(keep), 3))

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        self.randomize({key: len(d[key]) for key in keys})
        for key in keys:
            keep, noise = self._draws[key]
            points = d[key]
            d[key] = points[keep] + convert_to_dst_type(noise, points, dtype=points.dtype)[0]
        return d
