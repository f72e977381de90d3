"""Geometry checks of a DICOM series before it becomes a volume (the MONAI Deploy app's input).

A CT acquired with gantry tilt stores axial-looking slices whose positions step along the table, not along
the slices' normal: the volume is sheared. The Deploy SDK's series-to-volume conversion builds an orthogonal
affine from the first slice's orientation and the slice spacing, so such a series would load into the wrong
geometry and the implant would not fit the patient. It is refused with a one-line message instead (the
fix is to resample the series onto an orthogonal grid first, e.g. 3D Slicer's DICOM import with its
acquisition-geometry regularization, and give the bundle the NIfTI / NRRD).

Plain numbers in, so that it is tested in the main suite; ``deploy/app.py`` reads the tags with pydicom.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["MAX_TILT_DEG", "slice_tilt_deg", "check_slice_geometry"]

MAX_TILT_DEG = 0.5  # rounding in the positions of an untilted series stays far below this


def slice_tilt_deg(orientation: Sequence[float], positions: Sequence[Sequence[float]]) -> float:
    """Angle (degrees) between the slices' normal (row x column of ImageOrientationPatient, 6 numbers) and
    the line through their ImagePositionPatient (N, 3), N >= 2: 0 for an orthogonal stack."""
    orientation = np.asarray(orientation, dtype=np.float64).reshape(2, 3)
    normal = np.cross(orientation[0], orientation[1])
    positions = np.asarray(positions, dtype=np.float64)
    order = np.argsort(positions @ normal)
    step = positions[order[-1]] - positions[order[0]]
    if np.linalg.norm(step) == 0:
        return 0.0
    cosine = abs(step @ normal) / (np.linalg.norm(step) * np.linalg.norm(normal))
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def check_slice_geometry(orientation: Sequence[float], positions: Sequence[Sequence[float]], name: str,
                         max_tilt_deg: float = MAX_TILT_DEG) -> None:
    """Raise ValueError naming the series if it has fewer than two slices or its slices are sheared by more
    than ``max_tilt_deg`` (:func:`slice_tilt_deg`)."""
    if len(positions) < 2:
        raise ValueError(f"{name}: a DICOM series of {len(positions)} slice(s) is not a 3D volume")
    tilt = slice_tilt_deg(orientation, positions)
    if tilt > max_tilt_deg:
        raise ValueError(
            f"{name}: the slices are sheared by {tilt:.1f} degrees (gantry tilt), which the DICOM-to-volume "
            "conversion would load into the wrong geometry; resample the series onto an orthogonal grid (e.g. "
            "3D Slicer's DICOM import with acquisition geometry regularization) and give the NIfTI/NRRD instead")
