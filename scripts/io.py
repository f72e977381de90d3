"""Binary-mask I/O for .nrrd / .nii / .nii.gz with validation and atomic, geometry-preserving writes.

Conventions: a loaded mask is a MONAI ``MetaTensor`` of shape (1, X, Y, Z), dtype uint8, values
{0, 1}, whose ``affine`` is the 4x4 RAS voxel-to-mm matrix as MONAI reports it. Masks stored as
{0, 255} (a common export convention) are accepted and mapped to {0, 1}; any other value set is
rejected.
"""

from __future__ import annotations

import bz2
import gzip
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import torch
from monai.data import ITKWriter, MetaTensor, NibabelWriter
from monai.data.utils import affine_to_spacing
from monai.transforms import LoadImage, MapTransform
from monai.utils import convert_to_numpy

__all__ = [
    "MASK_SUFFIXES",
    "MaskError",
    "mask_suffix",
    "read_header_geometry",
    "PEAK_BYTES_PER_VOXEL",
    "MAX_INPUT_VOXELS",
    "check_input_size",
    "affine_spacing",
    "mask_spacing",
    "is_isotropic",
    "validate_mask",
    "ValidateMaskd",
    "load_volume",
    "load_mask",
    "save_mask",
    "atomic_write",
    "atomic_folder",
    "volume3d",
    "mask3d",
]

MASK_SUFFIXES = (".nrrd", ".nii.gz", ".nii")
# Peak memory of one inference case per input voxel: 12 B measured for loading + preprocessing an isotropic int16
# CT (256^3, ru_maxrss, configs/inference.json's preprocessing), about as much again for the input-grid results
# (implant, ensemble members, float32 variance, writer copies), and room for an anisotropic input's resampling.
PEAK_BYTES_PER_VOXEL = 32
MAX_INPUT_VOXELS = 24 * 1024**3 // PEAK_BYTES_PER_VOXEL  # what 24 GB holds: 805,306,368 voxels (about 930^3)
_NRRD_COMPRESSED = {"gzip": lambda f: gzip.GzipFile(fileobj=f), "gz": lambda f: gzip.GzipFile(fileobj=f),
                    "bzip2": bz2.BZ2File, "bz2": bz2.BZ2File}
_UMASK = os.umask(0)
os.umask(_UMASK)


def volume3d(x, name: str) -> np.ndarray:
    """(X, Y, Z) or (1, X, Y, Z) numpy/torch volume -> numpy (X, Y, Z); ``name`` goes in the error."""
    a = convert_to_numpy(x)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"{name}: expected an (X, Y, Z) or (1, X, Y, Z) volume, got shape {tuple(a.shape)}.")
    return a


def mask3d(x, name: str) -> np.ndarray:
    """(X, Y, Z) or (1, X, Y, Z) numpy/torch volume -> bool (X, Y, Z); non-zero is foreground."""
    return volume3d(x, name) != 0


class MaskError(ValueError):
    """A mask file or array is unusable; the message names the file (or array) and the problem."""


def mask_suffix(path: str | os.PathLike) -> str:
    """Return the supported suffix of ``path`` ('.nrrd', '.nii.gz' or '.nii'), else raise MaskError."""
    name = Path(path).name.lower()
    for suffix in MASK_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise MaskError(f"{path}: unsupported file type, expected one of {', '.join(MASK_SUFFIXES)}")


def _reason(err: BaseException) -> str:
    """A reader's error as one line: "<type>: <message>" (readers' messages may span lines)."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def read_header_geometry(path: str | os.PathLike) -> tuple[tuple[int, ...], tuple[float, ...] | None]:
    """Read (shape, spacing in mm) from the file header only, without loading voxels.

    Spacing is None when the header stores no spatial geometry (NRRD without 'space directions').
    Raises MaskError for missing/unreadable files.
    """
    path = Path(path)
    suffix = mask_suffix(path)
    if not path.is_file():
        raise MaskError(f"{path}: file not found")
    try:
        if suffix == ".nrrd":
            header = nrrd.read_header(str(path))
            shape = tuple(int(s) for s in header["sizes"])
            directions = header.get("space directions")
            if directions is None:
                return shape, None
            # rows of non-spatial axes (e.g. a channel axis) are NaN in pynrrd
            spacing = tuple(float(np.linalg.norm(row)) for row in np.asarray(directions, dtype=float))
            return shape, spacing
        header = nib.load(str(path)).header
        shape = tuple(int(s) for s in header.get_data_shape())
        return shape, tuple(float(z) for z in header.get_zooms()[: len(shape)])
    except Exception as err:  # pynrrd / nibabel raise many types for corrupt or non-image files
        raise MaskError(f"{path}: not a readable {suffix} image ({_reason(err)})") from err


def check_input_size(path: str | os.PathLike, shape: Sequence[int], max_voxels: int = MAX_INPUT_VOXELS) -> None:
    """Refuse, before anything of that size is allocated, an input whose header ``shape`` exceeds ``max_voxels``,
    an NRRD with detached data (``data file``: a path chosen by the file) and a compressed NRRD whose data
    inflates beyond 8 bytes per header voxel (a decompression bomb: pynrrd would inflate all of it into memory;
    counted in 1 MiB chunks). Raises MaskError naming the file."""
    voxels = math.prod(shape)
    if voxels > max_voxels:
        raise MaskError(f"{path}: header claims {' x '.join(map(str, shape))} = {voxels:,} voxels, over the limit of "
                        f"{max_voxels:,} (--max_input_voxels); refused before loading")
    if mask_suffix(path) != ".nrrd":
        return  # nibabel reads exactly the header's number of bytes from a .nii.gz stream
    header = nrrd.read_header(str(path))
    if "data file" in header or "datafile" in header:
        raise MaskError(f"{path}: detached NRRD data ('data file') is not supported; store the voxels in the .nrrd")
    opener = _NRRD_COMPRESSED.get(str(header.get("encoding", "")).lower())
    if opener is None:
        return
    bound, inflated = 8 * voxels + max(int(header.get("byte skip", 0)), 0), 0
    try:
        with open(path, "rb") as f:
            while f.readline().strip():  # the header ends at the first empty line
                pass
            with opener(f) as stream:
                while inflated <= bound and (chunk := stream.read(1 << 20)):
                    inflated += len(chunk)
    except (OSError, EOFError, ValueError) as err:
        raise MaskError(f"{path}: cannot read image data (corrupt {header['encoding']} data, {_reason(err)})") from None
    if inflated > bound:
        raise MaskError(f"{path}: {header['encoding']} data inflates beyond the {voxels:,} voxels its header "
                        "claims; refused before loading")


def affine_spacing(affine) -> np.ndarray:
    """Voxel spacing in mm, shape (3,), of a 4x4 voxel-to-mm affine (numpy or torch): the one place the
    bundle derives spacing from an affine."""
    return np.asarray(affine_to_spacing(torch.as_tensor(affine), r=3, suppress_zeros=False), dtype=np.float64)


def mask_spacing(img: MetaTensor) -> np.ndarray:
    """Voxel spacing in mm, shape (3,), from the MetaTensor's affine."""
    return affine_spacing(img.affine)


def is_isotropic(img: MetaTensor, tol: float = 1e-3) -> bool:
    """True if the spacings differ by at most ``tol`` relative to the largest spacing."""
    spacing = mask_spacing(img)
    return bool(np.ptp(spacing) <= tol * spacing.max())


def _check_spacing(spacing: Sequence[float] | None, name: str) -> None:
    if spacing is None:
        raise MaskError(f"{name}: no voxel spacing in the header (NRRD 'space directions' missing)")
    spacing = np.asarray(spacing, dtype=np.float64)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise MaskError(f"{name}: missing or non-positive voxel spacing {spacing.tolist()}")


def validate_mask(img: MetaTensor, name: str | None = None) -> MetaTensor:
    """Check a loaded mask and return it as (1, X, Y, Z) uint8 with values {0, 1}.

    Args:
        img: channel-first MetaTensor (1, X, Y, Z), e.g. from LoadImage(ensure_channel_first=True).
        name: used in error messages; defaults to the file name in ``img.meta``.
    Raises:
        MaskError: not 3D / several channels, empty, non-binary values, bad spacing.
    """
    if name is None:
        name = str(getattr(img, "meta", {}).get("filename_or_obj", "<mask array>"))
    if not isinstance(img, MetaTensor):
        raise MaskError(f"{name}: expected a MONAI MetaTensor with an affine, got {type(img).__name__}")
    if img.ndim != 4:
        raise MaskError(f"{name}: expected a 3D volume (1, X, Y, Z), got {img.ndim - 1}D data {tuple(img.shape)}")
    if img.shape[0] != 1:
        raise MaskError(f"{name}: expected a single 3D volume, got 4D data with {img.shape[0]} volumes")
    _check_spacing(mask_spacing(img), name)
    data = img.as_tensor()
    if not bool(data.any()):
        raise MaskError(f"{name}: empty mask (all voxels are 0)")
    zero = data == 0
    if bool((zero | (data == 1)).all()):
        return img.to(torch.uint8)
    if bool((zero | (data == 255)).all()):
        return (img > 0).to(torch.uint8)
    values = torch.unique(data).tolist()  # only on failure: sorting a 512^3 volume is slow
    shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
    raise MaskError(f"{name}: not a binary mask, values {{{shown}}} (expected {{0, 1}} or {{0, 255}})")


class ValidateMaskd(MapTransform):
    """Dictionary version of :func:`validate_mask`, for use after LoadImaged + EnsureChannelFirstd."""

    def __call__(self, data: Mapping[Hashable, MetaTensor]) -> dict[Hashable, MetaTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = validate_mask(d[key])
        return d


def load_volume(path: str | os.PathLike, max_voxels: int = MAX_INPUT_VOXELS) -> MetaTensor:
    """Load a 3D image without checking its values -> MetaTensor (1, X, Y, Z) with RAS affine.

    The header is checked first (cheap, and gives clear messages for 2D/4D data, missing
    spacing and oversized or inflating data (:func:`check_input_size`), which would otherwise surface as
    opaque reader errors or exhaust memory).
    """
    path = Path(path)
    shape, spacing = read_header_geometry(path)
    if len(shape) != 3:
        raise MaskError(f"{path}: expected a 3D volume, got {len(shape)}D data of shape {shape}")
    if min(shape) < 1:
        raise MaskError(f"{path}: no voxels, the header gives shape {shape}")
    _check_spacing(spacing, str(path))
    check_input_size(path, shape, max_voxels)
    try:
        return LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    except Exception as err:  # readers raise RuntimeError/ValueError/OSError/... for corrupt data
        raise MaskError(f"{path}: cannot read image data ({_reason(err)})") from err


def load_mask(path: str | os.PathLike, max_voxels: int = MAX_INPUT_VOXELS) -> MetaTensor:
    """Load and validate a binary mask -> MetaTensor (1, X, Y, Z) uint8 with RAS affine."""
    return validate_mask(load_volume(path, max_voxels), str(path))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path`` (same suffix), then rename it
    over ``path`` with os.replace, so readers never see a partial file and a crash leaves none.

    Raises FileExistsError naming ``path`` if it exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: file exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = mask_suffix(path) if path.name.endswith(MASK_SUFFIXES) else path.suffix
    fd, tmp = tempfile.mkstemp(suffix=suffix, prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the result normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``path`` to fill; on success it replaces ``path`` (os.replace),
    on any error it is removed, so a crash never leaves a partial result folder.

    The folder gets the normal umask permissions of ``mkdir`` (mkdtemp alone would make it 0700).
    Raises FileExistsError naming ``path`` if it exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: folder exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_mask(
    path: str | os.PathLike,
    array: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor | None = None,
    reference: MetaTensor | None = None,
    dtype: np.dtype | type = np.uint8,
    overwrite: bool = False,
) -> Path:
    """Atomically write a (X, Y, Z) or (1, X, Y, Z) volume with a 4x4 RAS affine.

    The writer is chosen by suffix: .nrrd -> ITKWriter (gzip), .nii/.nii.gz -> NibabelWriter.
    Data goes to a temporary file with the same suffix in the target folder which is then
    renamed over ``path`` (os.replace), so readers never see a partial file.

    Args:
        path: output file (.nrrd, .nii or .nii.gz).
        array: volume (X, Y, Z) or (1, X, Y, Z); numpy or torch.
        affine: 4x4 RAS voxel-to-mm matrix; if None, ``reference.affine`` is used.
        reference: MetaTensor whose affine is used when ``affine`` is None.
        dtype: on-disk dtype, e.g. np.uint8 for masks, np.float32 for variance maps.
        overwrite: replace an existing file instead of raising FileExistsError.
    Returns:
        The written path.
    """
    path = Path(path)
    suffix = mask_suffix(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: file exists (pass overwrite=True to replace it)")
    if affine is None:
        if reference is None:
            raise ValueError(f"{path}: save_mask needs an affine or a reference MetaTensor")
        affine = reference.affine
    affine = np.asarray(torch.as_tensor(affine, dtype=torch.float64).cpu(), dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"{path}: affine must be a finite, invertible 4x4 matrix, got\n{affine}")
    data = np.asarray(torch.as_tensor(array).detach().cpu())
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected an array (X, Y, Z) or (1, X, Y, Z), got shape {data.shape}")

    writer = ITKWriter(output_dtype=dtype) if suffix == ".nrrd" else NibabelWriter(output_dtype=dtype)
    writer.set_data_array(data.astype(dtype, copy=False), channel_dim=None)
    # set the affine directly: set_metadata(resample=False) still runs MONAI's resampler, which in MONAI
    # 1.6 takes a channel-less 3D array for a 2D one and fails on volumes whose axes are permuted
    # against the world axes (e.g. sagittal or coronal storage order)
    writer.affine = affine
    options = {"compression": True} if suffix == ".nrrd" else {}
    return atomic_write(path, lambda tmp: writer.write(tmp, **options), overwrite=True)
