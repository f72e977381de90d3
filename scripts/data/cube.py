"""Transforms that place a mask in the periodic DPSR cube and derive the voxelizer's inputs/targets.

Training and inference share the placement: the (isotropic) volume is zero-padded symmetrically to a
cube of side ``max(X, Y, Z) + 2 * margin`` (:func:`scripts.data.resample.pad_to_cube`), so the skull
stays ``margin`` voxels away from the FFT grid's wrap-around; points are then mapped to the unit cube
by ``voxel / side`` (:mod:`scripts.networks.dpsr` conventions).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.data.resample import pad_to_cube
from scripts.networks.dpsr import voxel_to_unit
from scripts.networks.sap import gt_indicator


class PadToCubed(MapTransform):
    """Pad (1, X, Y, Z) masks to (1, s, s, s), s = max(X, Y, Z) + 2 * margin; stores s as ``side_key``.

    All keys must share one grid (e.g. the defective and complete skull of one case).
    """

    def __init__(self, keys: KeysCollection, margin: int = 8, side_key: str = "cube_side") -> None:
        super().__init__(keys)
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin, self.side_key = margin, side_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        shapes = {tuple(d[k].shape[1:]) for k in self.key_iterator(d)}
        if len(shapes) != 1:
            raise ValueError(f"PadToCubed: keys {list(self.keys)} have different shapes {sorted(shapes)}")
        side = max(shapes.pop()) + 2 * self.margin
        for key in self.key_iterator(d):
            d[key] = pad_to_cube(d[key], side)
        d[self.side_key] = side
        return d


class VoxelToUnitd(MapTransform):
    """Point keys (N, 3) in voxel coordinates of the padded cube -> unit-cube coordinates."""

    def __init__(self, keys: KeysCollection, side_key: str = "cube_side") -> None:
        super().__init__(keys)
        self.side_key = side_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        side = int(d[self.side_key])
        for key in self.key_iterator(d):
            d[key] = voxel_to_unit(d[key], (side, side, side)).clamp(0.0, (side - 1) / side)
        return d


class IndicatorTargetd(MapTransform):
    """Complete-skull mask (1, s, s, s) -> ground-truth indicator (res, res, res): -0.5 in, +0.5 out."""

    def __init__(self, keys: KeysCollection, res: int, output_key: str = "indicator") -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"IndicatorTargetd takes one mask key, got {self.keys}")
        self.res, self.output_key = res, output_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        d[self.output_key] = gt_indicator(d[self.keys[0]][0], self.res)
        return d
