"""Isotropic resampling of binary masks and the exact way back to the original voxel grid.

SkullFix volumes are anisotropic (512 x 512 x Z); the model works on an isotropic grid (the paper
uses 0.45 mm, padded to a 512^3 cube) and the implant is written on the input's exact grid.
Binary masks are resampled linearly and thresholded at 0.5, which keeps thin bone smoother than
nearest-neighbour interpolation. All functions take/return channel-first MetaTensors (1, X, Y, Z)
and keep the direction cosines and origin of the input.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, ResampleToMatch, Spacing, SpatialCrop, SpatialPad

from scripts.io import is_isotropic, mask_spacing

__all__ = ["to_isotropic", "Isotropicd", "to_original_grid", "pad_to_cube", "crop_from_cube"]


def _binarize(img: MetaTensor) -> MetaTensor:
    return (img >= 0.5).to(torch.uint8)


def to_isotropic(img: MetaTensor, spacing_mm: float | None = None) -> MetaTensor:
    """Resample a binary mask (1, X, Y, Z) to isotropic voxels -> uint8 (1, X', Y', Z').

    Args:
        img: mask with its affine.
        spacing_mm: target spacing; default the finest spacing of ``img``.
    """
    if spacing_mm is None:
        spacing_mm = float(mask_spacing(img).min())
    if spacing_mm <= 0:
        raise ValueError(f"to_isotropic: spacing_mm must be positive, got {spacing_mm}")
    return _binarize(Spacing(pixdim=spacing_mm, mode="bilinear")(img.float()))


class Isotropicd(MapTransform):
    """Masks (1, X, Y, Z) with anisotropic voxels -> :func:`to_isotropic`; isotropic ones pass unchanged."""

    def __call__(self, data: Mapping[Hashable, MetaTensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key] if is_isotropic(d[key]) else to_isotropic(d[key])
        return d


def to_original_grid(mask: MetaTensor, reference: MetaTensor, binary: bool = True) -> MetaTensor:
    """Resample ``mask`` (1, X', Y', Z') onto the grid of ``reference`` (1, X, Y, Z).

    Works from any grid covering the reference (isotropic, padded cube, ...). Values beyond the
    mask's edge repeat its border; this only matters for the sub-voxel sliver that isotropic
    resampling may cut off at the far end of an axis. The result has the reference's exact
    spatial shape and affine.

    Args:
        mask: binary mask or float map (e.g. a variance map) with its affine.
        reference: the original image defining the output grid.
        binary: threshold the linearly resampled values at 0.5 -> uint8; else float32.
    """
    out = ResampleToMatch(mode="bilinear", padding_mode="border")(mask.float(), img_dst=reference)
    out.affine = reference.affine.clone()  # numerically recomputed by MONAI; make it bit-identical
    return _binarize(out) if binary else out


def pad_to_cube(img: MetaTensor, size: int) -> MetaTensor:
    """Zero-pad (1, X, Y, Z) symmetrically to (1, size, size, size); the affine follows the padding."""
    if any(s > size for s in img.shape[1:]):
        raise ValueError(f"pad_to_cube: volume {tuple(img.shape[1:])} is larger than the cube side {size}")
    return SpatialPad(spatial_size=size, method="symmetric")(img)


def crop_from_cube(mask: MetaTensor, reference: MetaTensor) -> MetaTensor:
    """Crop ``mask`` back to the grid of ``reference``, which must be a sub-grid of it.

    The crop window is found from the two affines (same spacing and direction, integer offset),
    so it does not rely on the transform history of ``mask``. Returns (1, X, Y, Z) with the
    reference's exact affine.
    """
    m_aff = np.asarray(mask.affine, dtype=np.float64)
    r_aff = np.asarray(reference.affine, dtype=np.float64)
    if not np.allclose(m_aff[:3, :3], r_aff[:3, :3], atol=1e-6):
        raise ValueError("crop_from_cube: mask and reference differ in spacing or direction")
    start = np.linalg.solve(m_aff[:3, :3], r_aff[:3, 3] - m_aff[:3, 3])
    start_int = np.rint(start).astype(int)
    end = start_int + np.asarray(reference.shape[1:])
    if not np.allclose(start, start_int, atol=1e-3) or np.any(start_int < 0) or np.any(end > mask.shape[1:]):
        raise ValueError(
            f"crop_from_cube: reference grid {tuple(reference.shape[1:])} at voxel offset {start.round(3).tolist()} "
            f"is not a sub-grid of the mask {tuple(mask.shape[1:])}"
        )
    out = SpatialCrop(roi_start=start_int.tolist(), roi_end=end.tolist())(mask)
    out.affine = reference.affine.clone()  # equal up to rounding, checked above
    return out
