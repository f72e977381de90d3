"""What an inference case writes: the implant masks, an STL surface mesh in scanner millimetres, a
preview PNG and the case summary, together in ``<output_dir>/<case>/`` (:class:`SaveCased`).

Meshes: marching cubes on the (optionally Gaussian-smoothed) mask, vertices mapped through the MONAI
voxel-to-RAS affine and written in LPS by default. 3D Slicer (since 4.11, 2020) assumes LPS for mesh
files and reads the coordinate system from a ``SPACE=LPS`` / ``SPACE=RAS`` tag in the file header,
which :func:`write_stl` writes; a mesh exported here therefore overlays the input image in Slicer.
Faces are wound counter-clockwise seen from outside (outward normals, positive signed volume).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from monai.transforms import Transform
from monai.utils import convert_to_numpy
from scipy import ndimage
from skimage.measure import marching_cubes

from scripts.implant import expected_wrong
from scripts.io import atomic_folder, atomic_write, is_isotropic, mask3d, mask_spacing, mask_suffix, save_mask
from scripts.paths import inside
from scripts.weights import weights_hash

__all__ = ["COORDINATE_SYSTEMS", "UNSURE_VARIANCE", "UNSURE_MM", "mask_to_mesh", "write_stl", "save_stl", "first_hit",
           "depth_view", "unsure", "wrong_thickness", "save_preview", "SaveCased"]

# p (1 - p) at or above which a voxel counts as unsure: 0.05 < p < 0.95, any disagreement of up to 19 binary members
# (the preview shows these voxels; tools/calibration.py counts the wrong voxels among them)
UNSURE_VARIANCE = 0.05
# expected wrong thickness (mm) along a line of sight at which the preview's colour saturates (yellow); the priors'
# soft surfaces alone give about 1 mm through a thin implant (2 surfaces x 0.8 surface_sd), a misplaced rim or a
# disputed patch several mm
UNSURE_MM = 5.0

COORDINATE_SYSTEMS = ("LPS", "RAS")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

# binary STL record: normal, 3 vertices (float32 little endian), 16-bit attribute; 50 bytes, no padding
_STL_RECORD = np.dtype([("normal", "<f4", (3,)), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")])


def _check_coordinate_system(coordinate_system: str) -> str:
    if coordinate_system not in COORDINATE_SYSTEMS:
        raise ValueError(f"coordinate_system: expected one of {COORDINATE_SYSTEMS}, got {coordinate_system!r}.")
    return coordinate_system


def mask_to_mesh(
    mask, affine, smooth: float = 0.5, step_size: int = 1, coordinate_system: str = "LPS"
) -> tuple[np.ndarray, np.ndarray]:
    """Closed triangle surface of a binary mask in millimetres.

    Args:
        mask: (X, Y, Z) or (1, X, Y, Z) binary volume; must not be empty.
        affine: 4x4 voxel-index -> RAS mm matrix, as MONAI reports it (``img.affine``).
        smooth: Gaussian sigma in voxels applied to the mask before marching cubes at level 0.5
            (reduces staircase artefacts; 0 disables). Keep it <= ~1 so 1-2 voxel thin parts survive.
        step_size: marching-cubes step in voxels (> 1 gives a coarser, smaller mesh).
        coordinate_system: "LPS" (Slicer's default for mesh files) or "RAS".
    Returns:
        verts: float64 (V, 3) in mm, faces: int64 (F, 3) vertex indices with outward normals.
    """
    m = mask3d(mask, "mask")
    a = np.asarray(convert_to_numpy(affine), dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ValueError(f"affine: expected a finite, invertible 4x4 matrix, got\n{a}")
    _check_coordinate_system(coordinate_system)
    if smooth < 0:
        raise ValueError(f"smooth: must be >= 0, got {smooth}.")
    boxes = ndimage.find_objects(m.view(np.uint8))
    if not boxes:
        raise ValueError("mask: empty (no foreground voxels), cannot build a surface mesh.")
    # crop to the bounding box and pad with zeros so the surface is closed where the mask touches
    # the volume border and the blur has room
    pad = math.ceil(3 * smooth) + 1
    field = np.pad(m[boxes[0]], pad).astype(np.float32)
    if smooth > 0:
        field = ndimage.gaussian_filter(field, smooth)
    # 'ascent' winds faces counter-clockwise around the gradient towards the inside, i.e. outward
    # normals in index space (the default 'descent' points them inwards)
    verts, faces, _, _ = marching_cubes(field, level=0.5, step_size=step_size, gradient_direction="ascent")
    verts = verts.astype(np.float64) + np.array([s.start - pad for s in boxes[0]], dtype=np.float64)
    linear = a[:3, :3] if coordinate_system == "RAS" else _RAS_TO_LPS @ a[:3, :3]
    offset = a[:3, 3] if coordinate_system == "RAS" else _RAS_TO_LPS @ a[:3, 3]
    verts = verts @ linear.T + offset
    faces = faces.astype(np.int64)
    if np.linalg.det(linear) < 0:  # a mirroring affine turns the winding inside out
        faces = faces[:, ::-1].copy()
    return verts, faces


def write_stl(
    path: str | os.PathLike, verts, faces, coordinate_system: str = "LPS", overwrite: bool = False
) -> Path:
    """Write a binary STL atomically, tagging the 80-byte header with ``SPACE=<coordinate_system>``.

    Written with numpy rather than Open3D because Open3D cannot set the header text, which is where
    3D Slicer looks for the coordinate system; the format is a fixed 50-byte record per triangle.

    Args:
        path: output .stl file.
        verts: float (V, 3) vertex positions in mm. faces: int (F, 3) vertex indices.
        coordinate_system: "LPS" or "RAS", the system ``verts`` are expressed in.
        overwrite: replace an existing file instead of raising FileExistsError.
    """
    _check_coordinate_system(coordinate_system)
    v = np.asarray(verts, dtype=np.float64)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3 or not np.all(np.isfinite(v)):
        raise ValueError(f"{path}: verts must be finite (V, 3), got shape {v.shape}.")
    if f.ndim != 2 or f.shape[1] != 3 or not np.issubdtype(f.dtype, np.integer) or len(f) == 0:
        raise ValueError(f"{path}: faces must be integer (F, 3) with F >= 1, got {f.dtype} {f.shape}.")
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"{path}: faces index vertices outside 0..{len(v) - 1}.")
    tri = v[f]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    length = np.linalg.norm(normal, axis=1, keepdims=True)
    records = np.zeros(len(f), dtype=_STL_RECORD)
    records["normal"] = np.divide(normal, length, out=np.zeros_like(normal), where=length > 0)
    records["vertices"] = tri
    header = f"cranial_implant_pcdiff binary STL, mm, SPACE={coordinate_system}".encode("ascii").ljust(80, b" ")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(header)
            fh.write(np.uint32(len(f)).astype("<u4").tobytes())
            fh.write(records.tobytes())

    return atomic_write(path, write, overwrite)


def save_stl(
    path: str | os.PathLike,
    mask,
    affine,
    coordinate_system: str = "LPS",
    smooth: float = 0.5,
    step_size: int = 1,
    overwrite: bool = False,
) -> Path:
    """Mask (X, Y, Z) + MONAI affine -> binary STL in mm (see :func:`mask_to_mesh`, :func:`write_stl`)."""
    verts, faces = mask_to_mesh(mask, affine, smooth, step_size, coordinate_system)
    return write_stl(path, verts, faces, coordinate_system, overwrite)


def first_hit(mask: np.ndarray, axis: int, from_end: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Where rays along ``axis`` first meet a bool mask, seen from its high-index end (or from index 0).

    Returns (hit, index): bool and int (B, C) over the two remaining axes in order.
    """
    hit = mask.any(axis=axis)
    if from_end:
        return hit, mask.shape[axis] - 1 - np.argmax(np.flip(mask, axis=axis), axis=axis)
    return hit, np.argmax(mask, axis=axis)


def depth_view(mask: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Projection along ``axis``, viewed from its high-index end: (hit, depth) with depth the first hit's
    index scaled to 0 (far side) .. 1 (near side)."""
    hit, index = first_hit(mask, axis)
    return hit, index / max(mask.shape[axis] - 1, 1)


def unsure(probability: np.ndarray) -> np.ndarray:
    """The voxels an ensemble is unsure of: p (1 - p) >= ``UNSURE_VARIANCE`` for a probability of bone p (any
    shape); bool, same shape."""
    p = np.asarray(probability)
    return p * (1.0 - p) >= UNSURE_VARIANCE


def wrong_thickness(probability: np.ndarray, implant: np.ndarray, axis: int, voxel_mm: float = 1.0) -> np.ndarray:
    """Expected wrong thickness of the ``implant`` (bool (X, Y, Z)) along each line of sight parallel to ``axis``
    if each voxel is bone with ``probability`` (X, Y, Z): the sum of :func:`~scripts.implant.expected_wrong` times
    the voxel size ``voxel_mm`` along ``axis``; float (B, C) over the other two axes (the projection of
    ``expected_wrong_ml``)."""
    return expected_wrong(probability, implant).sum(axis=axis) * voxel_mm


def save_preview(
    path: str | os.PathLike,
    skull,
    implant,
    probability=None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    title: str | None = None,
    figsize: tuple[float, float] = (12.0, 4.5),
    dpi: int = 100,
    overwrite: bool = False,
) -> Path:
    """PNG with three depth-shaded views of the defective skull (grey) with the implant in colour.

    Views look down the array axes from their high-index end: "axial" along k, "coronal" along j,
    "sagittal" along i (anatomical names assume the usual axial-slice storage). Each view is drawn in
    millimetres (``spacing``), so anisotropic voxels keep their physical aspect. The implant is opaque
    where it is in front of the skull and translucent where the skull hides it. With an ensemble's
    ``probability`` the overlay covers implant | (p (1 - p) >= ``UNSURE_VARIANCE``) and each line of sight is
    coloured by the implant's expected wrong thickness along it in mm (:func:`wrong_thickness`, the projection of
    ``expected_wrong_ml``), from dark (0 mm) to yellow (``UNSURE_MM`` or more). The largest p (1 - p) along a
    ray would not do: every ray through a thin implant crosses its soft surfaces, where p is near 0.5.

    Args:
        path: output .png file. skull, implant: binary (X, Y, Z) volumes on the same grid.
        probability: optional float (X, Y, Z) ensemble probability of implant bone in [0, 1].
        spacing: voxel size in mm along (i, j, k).
        title: optional figure title (e.g. the case id).
        figsize, dpi: the PNG is round(figsize * dpi) pixels (width, height).
    """
    s, imp = mask3d(skull, "skull"), mask3d(implant, "implant")
    if s.shape != imp.shape:
        raise ValueError(f"skull {s.shape} and implant {imp.shape} differ in shape.")
    sp = np.asarray(spacing, dtype=np.float64).ravel()
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing: expected three positive voxel sizes in mm, got {spacing!r}.")
    p = None
    overlay = imp
    if probability is not None:
        p = convert_to_numpy(probability).astype(np.float32, copy=False)
        p = p[0] if p.ndim == 4 and p.shape[0] == 1 else p
        if p.shape != s.shape:
            raise ValueError(f"probability {p.shape} and skull {s.shape} differ in shape.")
        overlay = imp | unsure(p)
    cmap, norm = colormaps["plasma"], Normalize(0.0, UNSURE_MM)
    implant_rgb = np.array([0.95, 0.45, 0.1])

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (axis, name) in zip(axes, ((2, "axial (along k)"), (1, "coronal (along j)"), (0, "sagittal (along i)"))):
        b, c = (d for d in range(3) if d != axis)
        s_hit, s_depth = depth_view(s, axis)
        o_hit, o_depth = depth_view(overlay, axis)
        rgb = np.ones(s_hit.shape + (3,))
        rgb[s_hit] = (0.25 + 0.6 * s_depth[s_hit])[:, None]  # grey, nearer is brighter
        if p is None:
            colour = implant_rgb * (0.45 + 0.55 * o_depth)[..., None]
        else:
            colour = cmap(norm(wrong_thickness(p, imp, axis, sp[axis])))[..., :3]
        alpha = np.where(~s_hit | (o_depth >= s_depth), 1.0, 0.45)[..., None]
        rgb = np.where(o_hit[..., None], alpha * colour + (1 - alpha) * rgb, rgb)
        ax.imshow(
            np.transpose(rgb, (1, 0, 2)),
            origin="lower",
            extent=(0, s.shape[b] * sp[b], 0, s.shape[c] * sp[c]),
            interpolation="nearest",
        )
        ax.set_title(name)
        ax.set_xlabel(f"{'ijk'[b]} (mm)")
        ax.set_ylabel(f"{'ijk'[c]} (mm)")
    if p is None:
        fig.legend(
            handles=[Patch(color=(0.7, 0.7, 0.7), label="defective skull"), Patch(color=implant_rgb, label="implant")],
            loc="outside lower center",
            ncols=2,
        )
    else:
        fig.colorbar(ScalarMappable(norm, cmap), ax=axes, shrink=0.8, extend="max",
                     label="expected wrong (mm); yellow: check")
    if title:
        fig.suptitle(title)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi), overwrite)


def peak_rss_gib() -> float | None:
    """The process's peak resident memory so far in GiB (Linux ru_maxrss, KiB), None where the platform has no
    ``resource`` module (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


class SaveCased(Transform):
    """Write one case's results into ``<output_dir>/<case>/`` and put its summary under ``"summary"``.

    Files, in the input's format and grid: ``implant``; for an ensemble also ``implant_member_<k>``,
    ``implant_mean``, ``implant_probability`` (each voxel's probability of bone) and ``implant_variance``
    (p (1 - p)), float32; for a CT the derived ``skull_mask``; then
    ``implant.stl`` (mm, LPS), ``preview.png`` and ``summary.json``. The folder is built in a temporary
    sibling and renamed into place, so a crash never leaves partial results; an existing result folder
    raises FileExistsError unless ``overwrite``. ``weights``: files whose SHA-256 the summary records, with
    ``weights_verified``: whether each matches large_files.yml (null: not listed there, e.g. user-trained).

    Reads the keys the inference config's pipeline sets: ``case``, ``input``, ``skull`` (input-grid mask),
    ``input_type``, ``bone_threshold_hu``, ``pred`` (generator result), ``implant``, ``implant_members``,
    ``implant_probability``, ``implant_variance``, ``implant_voxels``, ``implant_open_fraction``, ``started``.
    """

    def __init__(self, output_dir: str | os.PathLike, weights: Sequence[str | os.PathLike] = (),
                 overwrite: bool = False, stl: bool = True, preview: bool = True) -> None:
        self.output_dir, self.weights = Path(output_dir), [Path(w) for w in weights]
        self.overwrite, self.stl, self.preview = overwrite, stl, preview
        self._hashes: dict | None = None  # hashed on the first case: the process loaded the weights once

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        path, name, img = Path(d["input"]), d["case"], d["skull"]
        final_dir = inside(self.output_dir, self.output_dir / name)
        if final_dir.exists() and not self.overwrite:
            raise FileExistsError(f"{final_dir}: results exist already (pass overwrite=True / --overwrite true)")
        if final_dir.resolve() == path.parent.resolve():
            raise ValueError(f"{final_dir}: output folder is the input's folder; choose another output_dir")
        suffix, spacing = mask_suffix(path), mask_spacing(img)
        if self._hashes is None:
            self._hashes = {w.name: weights_hash(w) for w in self.weights}
        hashes = self._hashes
        implant, members, variance = d["implant"], d["implant_members"], d["implant_variance"]
        defective = np.asarray(img[0]) > 0
        with atomic_folder(final_dir, self.overwrite) as tmp:
            save_mask(tmp / f"implant{suffix}", implant, reference=img)
            if d["input_type"] == "ct":
                save_mask(tmp / f"skull_mask{suffix}", img, reference=img)
            if members is not None:
                for k, member in enumerate(members):
                    save_mask(tmp / f"implant_member_{k}{suffix}", member, reference=img)
                save_mask(tmp / f"implant_mean{suffix}", implant, reference=img)
                save_mask(tmp / f"implant_probability{suffix}", d["implant_probability"], reference=img,
                          dtype=np.float32)
                save_mask(tmp / f"implant_variance{suffix}", variance, reference=img, dtype=np.float32)
            if self.stl:
                save_stl(tmp / "implant.stl", implant, img.affine)
            if self.preview:
                save_preview(tmp / "preview.png", defective, implant, probability=d["implant_probability"],
                             spacing=spacing, title=name)
            pred, voxels = d["pred"], d["implant_voxels"]
            frame = dict(d.get("frame") or {})
            frame_seconds = frame.pop("seconds", None)
            d["summary"] = {
                "case_id": name,
                "input": str(path.resolve()),
                "input_type": d["input_type"],
                "bone_threshold_hu": d["bone_threshold_hu"],
                "shape": list(img.shape[1:]),
                "spacing_mm": [float(s) for s in spacing],
                "resampled_to_isotropic": not is_isotropic(img),
                "implant_voxels": voxels,
                "implant_volume_ml": voxels * float(np.prod(spacing)) / 1000.0,
                "implant_open_fraction": round(d["implant_open_fraction"], 3),
                "member_voxels": [int(m.sum()) for m in pred["implants"]],
                # an ensemble's own estimate of how much of its implant is wrong (tools/calibration.py)
                **({"expected_wrong_ml": round(d["expected_wrong_ml"], 3)} if d.get("expected_wrong_ml") is not None
                   else {}),
                **frame,
                **pred["settings"],
                "weights": {name: sha for name, (sha, _, _) in hashes.items()},
                "weights_verified": {name: verified for name, (_, verified, _) in hashes.items()},
                "timings_s": {**({"frame": round(frame_seconds, 3)} if frame_seconds is not None else {}),
                              **{k: round(v, 3) for k, v in pred["timings"].items()},
                              "total": round(time.perf_counter() - d["started"], 3)},
                # the process's peak resident memory so far (a batch's peak stays flat from case to case)
                "peak_rss_gib": peak_rss_gib(),
            }
            (tmp / "summary.json").write_text(json.dumps(d["summary"], indent=2))
        return d
