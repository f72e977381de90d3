"""CT scans as input: the skull mask from a CT volume in Hounsfield units (HU).

The skull is the bone (voxels at or above ``bone_threshold_hu``) that forms the largest 26-connected
component: the CT table, the head holder, calcified or metal fragments lying apart, and isolated noise
voxels are other components and are dropped.

Default threshold: 150 HU, the value Li et al. used to extract skulls from head CTs for cranial implant
design datasets ("thresholding (HU value >= 150) and CT table removal"; Li, Gsaxner, Pepe, Morais, Alves,
von Campe, Wallner, Egger, *Synthetic skull bone defects for automatic patient-specific craniofacial
implant design*, Scientific Data 8:36, 2021, doi:10.1038/s41597-021-00806-0), from the group that
prepared the SkullFix / SkullBreak masks the method is trained on. Raise it (e.g. 300 HU, 3D Slicer's
usual bone preset) for noisy or contrast-enhanced scans; lower it for thin bone.

Automatic detection (``input_type="auto"``): a binary mask has no negative values, while any CT in HU
contains air (about -1000 HU); a volume with values at or below ``AIR_HU`` is read as a CT.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.implant import largest_component
from scripts.io import MAX_INPUT_VOXELS, MaskError, load_volume, mask_spacing, validate_mask

__all__ = ["DEFAULT_BONE_HU", "AIR_HU", "INPUT_TYPES", "check_input_type", "check_bone_threshold", "check_max_voxels",
           "skull_from_ct", "load_skull", "LoadSkulld", "value_range"]

DEFAULT_BONE_HU = 150.0
AIR_HU = -500.0
INPUT_TYPES = ("auto", "mask", "ct")

logger = logging.getLogger(__name__)


def check_input_type(input_type: str) -> str:
    """``input_type`` in lower case if it is one of INPUT_TYPES, else raise ValueError naming ``--input_type``."""
    kind = str(input_type).strip().lower()
    if kind not in INPUT_TYPES:
        raise ValueError(f"--input_type: expected one of {', '.join(INPUT_TYPES)}, got {input_type!r}")
    return kind


def check_bone_threshold(value) -> float:
    """``value`` as a float in HU, else raise ValueError naming ``--bone_threshold_hu``."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--bone_threshold_hu: expected a number (HU), got {value!r}") from None


def value_range(img: MetaTensor) -> tuple[float, float]:
    """(min, max) of a volume (1, X, Y, Z), in numpy: torch reduces a file's (Fortran) order 10x slower."""
    values = np.asarray(img.as_tensor() if isinstance(img, MetaTensor) else img)
    return float(values.min()), float(values.max())


def skull_from_ct(ct: MetaTensor, bone_threshold_hu: float = DEFAULT_BONE_HU, name: str = "<CT array>") -> MetaTensor:
    """CT (1, X, Y, Z) in HU -> skull mask (1, X, Y, Z) uint8 {0, 1} with the CT's affine: the largest
    26-connected component of the voxels >= ``bone_threshold_hu``. Raises MaskError when no voxel is bone."""
    bone_threshold_hu = check_bone_threshold(bone_threshold_hu)
    bone = np.ascontiguousarray(np.asarray(ct[0]) >= bone_threshold_hu)  # a file's (Fortran) order -> C order
    if not bone.any():
        low, high = value_range(ct)
        raise MaskError(f"{name}: no voxel at or above the bone threshold {bone_threshold_hu:g} HU "
                        f"(CT values {low:g}..{high:g}); lower --bone_threshold_hu")
    skull = largest_component(bone)
    ml = float(np.prod(mask_spacing(ct))) / 1000.0
    logger.info("%s: CT, bone >= %g HU: %.1f ml; skull (largest connected piece) %.1f ml, dropped %.1f ml "
                "(table, head holder, noise)", name, bone_threshold_hu, bone.sum() * ml, skull.sum() * ml,
                (bone.sum() - skull.sum()) * ml)
    return MetaTensor(torch.from_numpy(skull.view(np.uint8))[None], meta=dict(ct.meta))  # binary, not empty


def check_max_voxels(value) -> int:
    """``value`` as a positive int, else raise ValueError naming ``--max_input_voxels``."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"--max_input_voxels: expected a positive whole number of voxels, got {value!r}")
    return int(text)


def load_skull(path: str | os.PathLike, input_type: str = "auto", bone_threshold_hu: float = DEFAULT_BONE_HU,
               max_input_voxels: int = MAX_INPUT_VOXELS) -> tuple[MetaTensor, str]:
    """A skull mask or a CT file -> (skull mask (1, X, Y, Z) uint8 {0, 1}, "mask" or "ct").

    ``input_type``: "mask" (binary, validated), "ct" (HU, see :func:`skull_from_ct`) or "auto" (CT if its
    lowest value is air, at or below AIR_HU, which no binary mask has; else mask); the decision is logged. A file
    over ``max_input_voxels`` is refused from its header (:func:`scripts.io.check_input_size`).
    """
    kind = check_input_type(input_type)
    img = load_volume(path, max_input_voxels)
    if kind == "auto":
        low, high = value_range(img)
        kind = "ct" if low <= AIR_HU else "mask"
        logger.info("%s: values %g..%g, read as %s (--input_type auto)", path, low, high,
                    "a CT in Hounsfield units" if kind == "ct" else f"a binary skull mask (no air <= {AIR_HU:g} HU)")
    if kind == "mask":
        return validate_mask(img, str(path)).contiguous(), kind  # a file's (Fortran) order -> C order
    return skull_from_ct(img, bone_threshold_hu, str(path)), kind


class LoadSkulld(MapTransform):
    """Dictionary version of :func:`load_skull`: each key's file -> its skull mask (1, X, Y, Z); the
    decision ("mask" or "ct") goes to ``kind_key`` and the bone threshold used (None for a mask) to
    ``"bone_threshold_hu"``. Bad ``input_type`` / ``bone_threshold_hu`` / ``max_input_voxels`` values
    fail here, when the transform is built, not once per case."""

    def __init__(self, keys: KeysCollection, input_type: str = "auto", bone_threshold_hu: float = DEFAULT_BONE_HU,
                 kind_key: str = "input_type", max_input_voxels: int = MAX_INPUT_VOXELS) -> None:
        super().__init__(keys)
        self.input_type, self.bone_threshold_hu = check_input_type(input_type), check_bone_threshold(bone_threshold_hu)
        self.kind_key, self.max_input_voxels = kind_key, check_max_voxels(max_input_voxels)

    def __call__(self, data: Mapping[Hashable, str]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key], d[self.kind_key] = load_skull(d[key], self.input_type, self.bone_threshold_hu, self.max_input_voxels)
            d["bone_threshold_hu"] = self.bone_threshold_hu if d[self.kind_key] == "ct" else None
        return d
