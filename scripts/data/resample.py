"""Binary masks between grids: the way back from the model's grid to the input's exact voxel grid, and the
zero-padded cube the voxelizer trains on.

The model works on each skull's canonical cube (:mod:`scripts.frame`); the implant is written on the input's
exact grid. Binary masks are resampled linearly and thresholded at 0.5, which keeps thin bone smoother than
nearest-neighbour interpolation. All functions take/return channel-first MetaTensors (1, X, Y, Z).
"""

from __future__ import annotations

import torch
from monai.data import MetaTensor
from monai.transforms import ResampleToMatch, SpatialPad

__all__ = ["to_original_grid", "pad_to_cube"]


def _binarize(img: MetaTensor) -> MetaTensor:
    return (img >= 0.5).to(torch.uint8)


def to_original_grid(mask: MetaTensor, reference: MetaTensor, binary: bool = True) -> MetaTensor:
    """Resample ``mask`` (1, X', Y', Z') onto the grid of ``reference`` (1, X, Y, Z).

    Works from any grid, in any pose (the canonical cube of :mod:`scripts.frame`). Values beyond the
    mask's edge repeat its border (the canonical cube's border is its empty margin). The result has the
    reference's exact spatial shape and affine.

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
