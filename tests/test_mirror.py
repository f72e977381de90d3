"""The left-right mirror prior (scripts/mirror.py) on synthetic skulls and on constructed point sets."""

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from scripts.data.synthetic import skullbreak_case
from scripts.mirror import left_right_axis, mirror_guided_points, mirrored_missing_points


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


def _cap(direction, radius, n, rng, spread=0.1):
    """n points at ``radius`` around unit ``direction`` (angular spread ~``spread`` rad)."""
    d = np.asarray(direction, float) / np.linalg.norm(direction) + rng.normal(0.0, spread, (n, 3))
    return radius * d / np.linalg.norm(d, axis=1, keepdims=True)


def test_guided_points_replace_only_the_directions_the_mirror_covers():
    rng = np.random.default_rng(0)
    left, top = _cap([1, 0, 0], 50.0, 100, rng), _cap([0, 0, 1], 50.0, 100, rng)
    generated = np.concatenate([left, top])
    # the mirror's missing bone on the left, 3 voxels further out than the sample, plus asymmetry far away
    mirror_left, elsewhere = _cap([1, 0, 0], 53.0, 300, rng), _cap([0, -1, 0], 50.0, 50, rng)
    merged, fraction = mirror_guided_points(generated, np.concatenate([mirror_left, elsewhere]), np.zeros(3),
                                            np.random.default_rng(1))
    assert merged.shape == generated.shape
    radius = np.linalg.norm(merged, axis=1)
    from_mirror = np.isclose(radius, 53.0)
    assert 0.4 < fraction == from_mirror.mean() <= 0.5  # the left cap (its ragged edge may stay)
    assert (merged[from_mirror, 0] > 30.0).all()  # only left points came from the mirror, none from elsewhere
    assert np.isin(top, merged).all(axis=1).all()  # the top cap, which the mirror does not cover, is kept


def test_guided_points_keep_the_sample_when_the_mirror_covers_little():
    rng = np.random.default_rng(0)
    generated = _cap([0, 0, 1], 50.0, 200, rng)
    sliver = _cap([0.35, 0, 1], 50.0, 3, rng, spread=0.01)
    merged, fraction = mirror_guided_points(generated, sliver, np.zeros(3), rng)
    assert fraction == 0.0 and merged is generated
    merged, fraction = mirror_guided_points(generated, np.empty((0, 3)), np.zeros(3), rng)
    assert fraction == 0.0 and merged is generated
