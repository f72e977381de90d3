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

__all__ = ["reach", "to_original_box", "to_original_grid", "pad_to_cube"]


def _binarize(img: MetaTensor) -> MetaTensor:
    return (img >= 0.5).to(torch.uint8)


def reach(mask: MetaTensor, reference: MetaTensor) -> tuple[slice, slice, slice] | None:
    """The box of ``reference``'s voxels (1, X, Y, Z) whose values :func:`to_original_grid` can take from the
    nonzero voxels of ``mask`` (1, X', Y', Z'): their box, one voxel wider for the linear interpolation, mapped
    through both affines; None if the mask is empty. Elsewhere the resampled values are 0."""
    found = torch.nonzero(mask[0].as_tensor())
    if not len(found):
        return None
    lo, hi = found.min(0).values.double() - 1.0, found.max(0).values.double() + 1.0
    corners = torch.stack(torch.meshgrid(*[torch.stack([a, b]) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3)
    to_reference = torch.linalg.inv(reference.affine.double()) @ mask.affine.double()
    voxels = corners @ to_reference[:3, :3].T + to_reference[:3, 3]
    shape = torch.tensor(reference.shape[1:])
    start = torch.clamp(torch.floor(voxels.min(0).values).long() - 1, min=0)
    stop = torch.minimum(torch.ceil(voxels.max(0).values).long() + 2, shape)
    if (stop <= start).any():
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def to_original_box(mask: MetaTensor, reference: MetaTensor, binary: bool = True):
    """:func:`to_original_grid` computed only where it can be nonzero: ``(box, values (1, *box size))`` with the
    box of :func:`reach` (None, None for an empty mask). The full-resolution work of a large scan is then the
    size of the implant, not of the scan."""
    box = reach(mask, reference)
    if box is None:
        return None, None
    start = torch.tensor([b.start for b in box], dtype=torch.float64)
    affine = reference.affine.double().clone()
    affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    target = MetaTensor(torch.zeros((1, *(b.stop - b.start for b in box)), dtype=torch.uint8), affine=affine)
    out = ResampleToMatch(mode="bilinear", padding_mode="border")(mask.float(), img_dst=target)
    return box, (_binarize(out) if binary else out).as_tensor()


def to_original_grid(mask: MetaTensor, reference: MetaTensor, binary: bool = True,
                     exclude: MetaTensor | None = None) -> MetaTensor:
    """Resample ``mask`` (1, X', Y', Z') onto the grid of ``reference`` (1, X, Y, Z).

    Works from any grid, in any pose (the canonical cube of :mod:`scripts.frame`). Values beyond the
    mask's edge repeat its border (the canonical cube's border is its empty margin), and are computed only
    in the box the mask's nonzero voxels reach (:func:`to_original_box`). The result has the reference's exact
    spatial shape and affine.

    Args:
        mask: binary mask or float map (e.g. a variance map) with its affine.
        reference: the original image defining the output grid.
        binary: threshold the linearly resampled values at 0.5 -> uint8; else float32.
        exclude: optional mask on the reference's grid (1, X, Y, Z) whose nonzero voxels stay 0 (the skull an
            implant must not overlap), read only inside the box.
    """
    out = torch.zeros(reference.shape, dtype=torch.uint8 if binary else torch.float32)
    box, values = to_original_box(mask, reference, binary)
    if box is not None:
        if exclude is not None:
            values = values * (exclude[(slice(None), *box)].as_tensor() == 0)
        out[(slice(None), *box)] = values
    return MetaTensor(out, affine=reference.affine.clone())


def pad_to_cube(img: MetaTensor, size: int) -> MetaTensor:
    """Zero-pad (1, X, Y, Z) symmetrically to (1, size, size, size); the affine follows the padding."""
    if any(s > size for s in img.shape[1:]):
        raise ValueError(f"pad_to_cube: volume {tuple(img.shape[1:])} is larger than the cube side {size}")
    return SpatialPad(spatial_size=size, method="symmetric")(img)
