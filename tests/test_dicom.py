"""Gantry-tilted DICOM series are refused before they become a volume (scripts/dicom.py)."""

import numpy as np
import pytest

from scripts.dicom import check_slice_geometry, slice_tilt_deg

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def stack(num: int = 40, spacing: float = 2.5, seed: int = 0) -> np.ndarray:
    """ImagePositionPatient of ``num`` slices along the table (z), shuffled, with 0.01 mm rounding noise."""
    rng = np.random.default_rng(seed)
    positions = np.stack([np.full(num, -120.0), np.full(num, -100.0), np.arange(num) * spacing], axis=1)
    return rng.permutation(np.round(positions + rng.normal(0, 0.003, positions.shape), 2))


def test_an_orthogonal_stack_has_no_tilt_in_any_orientation():
    assert slice_tilt_deg(AXIAL, stack()) < 0.05
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    positions = np.stack([np.zeros(20), np.arange(20) * 0.8, np.zeros(20)], axis=1)
    assert slice_tilt_deg(coronal, positions) < 1e-6
    check_slice_geometry(AXIAL, stack(), "ct_series")


@pytest.mark.parametrize("tilt", [5.0, 15.0, -22.0])
def test_a_gantry_tilted_series_is_refused_with_its_angle(tilt):
    c, s = np.cos(np.radians(tilt)), np.sin(np.radians(tilt))
    tilted = (1.0, 0.0, 0.0, 0.0, c, s)  # the slice plane turns with the gantry
    positions = stack()  # the table moves along z
    assert slice_tilt_deg(tilted, positions) == pytest.approx(abs(tilt), abs=0.05)
    with pytest.raises(ValueError, match=rf"^1\.2\.3\.4: the slices are sheared by {abs(tilt):.1f} degrees \(gantry tilt\)"):
        check_slice_geometry(tilted, positions, "1.2.3.4")


def test_a_single_slice_is_no_volume():
    with pytest.raises(ValueError, match="1 slice"):
        check_slice_geometry(AXIAL, [[0.0, 0.0, 0.0]], "scout")
