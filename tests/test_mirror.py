"""The left-right mirror image of a defective skull (scripts/mirror.py) on synthetic skulls, with the priors'
numbers (:meth:`scripts.priors.AnatomicalPriors.mirror_transform`)."""

import numpy as np
import pytest

from scripts.data.synthetic import skullbreak_case
from scripts.mirror import mirror_transform, mirrored_skull
from scripts.priors import AnatomicalPriors

PRIORS = AnatomicalPriors()


@pytest.fixture(scope="module")
def case():
    return skullbreak_case(0, size=64)


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_the_mirror_image_has_the_bone_a_one_sided_defect_removed(case):
    """Parietotemporal defects are on one side: the aligned mirror image lies on the skull and fills most
    of the true implant. A bilateral defect straddles the midline, so its mirror image is the same hole."""
    defective, implant = case.defect("parietotemporal")
    transform = PRIORS.mirror_transform(defective, axis=0)
    assert np.linalg.det(transform[:3, :3]) == pytest.approx(-1.0, abs=1e-6)  # a reflection, no scaling
    mirrored = mirrored_skull(defective, transform)
    assert mirrored.shape == defective.shape
    assert _dice(mirrored, defective | implant) > 0.75
    assert (mirrored & implant).sum() > 0.6 * implant.sum()
    bilateral, hole = case.defect("bilateral")
    assert (mirrored_skull(bilateral, PRIORS.mirror_transform(bilateral, axis=0)) & hole).sum() < 0.15 * hole.sum()


def test_the_mirror_axis_matters(case):
    """Reflecting front-to-back (axis 1) instead of left-right mirrors the skull onto itself badly."""
    defective, _ = case.defect("parietotemporal")
    right = _dice(mirrored_skull(defective, PRIORS.mirror_transform(defective, axis=0)), defective)
    wrong = _dice(mirrored_skull(defective, PRIORS.mirror_transform(defective, axis=1)), defective)
    assert wrong < right - 0.15  # 0.53 against 0.77


def test_the_priors_pass_their_numbers_to_the_mirror(case):
    """The ICP's surface points and correspondence distance are the priors' ``mirror_points`` and
    ``icp_distance``, not numbers of their own."""
    defective, _ = case.defect("parietotemporal")
    np.testing.assert_array_equal(PRIORS.mirror_transform(defective, seed=3),
                                  mirror_transform(defective, num_surface=6000, icp_distance=0.3, seed=3))
    with pytest.raises(TypeError):
        mirror_transform(defective)
