"""The left-right mirror prior (scripts/mirror.py) on synthetic skulls and on constructed point sets."""

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from scripts.data.synthetic import skullbreak_case
from scripts.mirror import left_right_axis, mirrored_missing_points


@pytest.fixture(scope="module")
def case():
    return skullbreak_case(0, size=64)


def test_left_right_axis_is_the_array_axis_along_world_x():
    assert left_right_axis(None) == 0
    assert left_right_axis(np.diag([1.6, 1.6, 1.6, 1.0])) == 0
    lps_permuted = np.array([[0, 0, -0.8, 0], [0, -0.8, 0, 0], [0.8, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    assert left_right_axis(lps_permuted) == 2


def test_the_mirror_shows_the_bone_a_one_sided_defect_removed(case):
    """Parietotemporal defects are on one side: almost every mirrored point no bone explains lies on the
    true implant. A bilateral defect straddles the midline, so its mirror image is the same hole."""
    defective, implant = case.defect("parietotemporal")
    missing = mirrored_missing_points(defective, axis=0)
    distance = distance_transform_edt(~implant)
    voxels = np.clip(np.round(missing).astype(int), 0, np.array(implant.shape) - 1)
    assert len(missing) > 300
    assert (distance[tuple(voxels.T)] <= 2.0).mean() > 0.95
    assert len(mirrored_missing_points(case.defect("bilateral")[0], axis=0)) < 0.1 * len(missing)


def test_the_mirror_axis_matters(case):
    """Reflecting front-to-back (axis 1) instead of left-right mirrors an asymmetric skull onto itself badly:
    far more points are unexplained, most of them away from the defect."""
    defective, implant = case.defect("parietotemporal")
    wrong = mirrored_missing_points(defective, axis=1)
    voxels = np.clip(np.round(wrong).astype(int), 0, np.array(implant.shape) - 1)
    assert (distance_transform_edt(~implant)[tuple(voxels.T)] <= 2.0).mean() < 0.2
