"""The canonical head frame (scripts/frame.py) on the shipped sample moved in known ways."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy.spatial.transform import Rotation

from scripts.data.synthetic import skullbreak_case
from scripts.frame import CanonicalFramed, canonical_affine, estimate_frame, to_canonical
from scripts.io import load_mask
from scripts.metrics import dice
from tools.pose_study import moved

SAMPLE = Path(__file__).resolve().parents[1] / "sample" / "defective_skull.nrrd"


@pytest.fixture(scope="module")
def sample():
    img = load_mask(SAMPLE)
    return img, estimate_frame(np.asarray(img[0]) > 0, img.affine.numpy())


@pytest.mark.parametrize("angles", [(20, 15, 0), (-12, 8, 25), (0, -25, -20)])
def test_a_rotated_head_gets_the_upright_heads_frame(sample, angles):
    img, upright = sample
    rotation = Rotation.from_euler("xyz", angles, degrees=True)
    frame = estimate_frame(moved(img, rotation.as_matrix()), img.affine.numpy())
    # the rotated head's axes, turned back, are the upright head's axes
    error = Rotation.from_matrix(rotation.inv().as_matrix() @ frame.rotation) * Rotation.from_matrix(upright.rotation).inv()
    assert frame.source == "skull"
    assert np.degrees(error.magnitude()) < 2.5
    assert abs(frame.size_mm / upright.size_mm - 1) < 0.02
    centre = img.affine.numpy()[:3, :3] @ np.full(3, 63.5) + img.affine.numpy()[:3, 3]
    assert np.linalg.norm(rotation.inv().apply(frame.centre - centre) - (upright.centre - centre)) < 2.0  # mm


def test_a_smaller_head_is_measured_smaller_and_sees_the_same_canonical_skull(sample):
    img, upright = sample
    small = moved(img, 0.85 * np.eye(3))
    frame = estimate_frame(small, img.affine.numpy())
    assert frame.size_mm / upright.size_mm == pytest.approx(0.85, abs=0.015)
    cubes = [to_canonical(MetaTensor(torch.from_numpy(m[None].astype(np.uint8)), affine=img.affine),
                          canonical_affine(f, 144, 1.6), 144) for m, f in ((np.asarray(img[0]) > 0, upright), (small, frame))]
    assert dice(np.asarray(cubes[0][0]) > 0, np.asarray(cubes[1][0]) > 0) > 0.8  # voxel-thin shells, resampled twice


@pytest.mark.parametrize("axis, factor", [(0, 0.9), (1, 1.1), (2, 1.1)])
def test_a_stretched_head_is_measured_so_and_sees_the_same_canonical_skull(sample, axis, factor):
    """A head 10 % narrower, longer or taller than the sample: its proportions (width, length, height; the mean
    of the first two is 1) change by the stretch, and its canonical cube shows the upright head's."""
    img, upright = sample
    linear = np.eye(3)
    linear[axis, axis] = factor
    frame = estimate_frame(moved(img, linear), img.affine.numpy())
    extents = upright.proportions * upright.size_mm * np.diag(linear)  # the stretched head's, in mm
    assert np.allclose(frame.proportions, extents / extents[:2].mean(), atol=0.015)
    assert frame.size_mm == pytest.approx(extents[:2].mean(), rel=0.015)
    cubes = [to_canonical(MetaTensor(torch.from_numpy(m[None].astype(np.uint8)), affine=img.affine),
                          canonical_affine(f, 144, 1.6), 144)
             for m, f in ((np.asarray(img[0]) > 0, upright), (moved(img, linear), frame))]
    assert dice(np.asarray(cubes[0][0]) > 0, np.asarray(cubes[1][0]) > 0) > 0.8


def test_proportions_beyond_any_skulls_are_clipped_with_a_warning(sample, caplog):
    img, _ = sample
    with caplog.at_level(logging.WARNING, logger="scripts.frame"):
        frame = estimate_frame(moved(img, np.diag([1.0, 1.0, 1.45])), img.affine.numpy())
    assert frame.source == "skull" and frame.proportions[2] == pytest.approx(1.25)
    assert "clipped" in caplog.text


def test_the_frame_does_not_depend_on_the_files_axis_order(sample):
    img, upright = sample
    array = np.transpose(np.flip(np.asarray(img[0]) > 0, axis=0), (2, 0, 1))
    affine = img.affine.numpy().copy()
    affine[:3, 3] += affine[:3, 0] * (img.shape[1] - 1)
    affine[:3, 0] = -affine[:3, 0]
    affine[:3, :3] = affine[:3, :3][:, [2, 0, 1]]
    frame = estimate_frame(array, affine)
    assert np.allclose(frame.rotation, upright.rotation, atol=1e-6)
    assert np.allclose(frame.centre, upright.centre, atol=1e-4)
    assert np.allclose(frame.proportions, upright.proportions, atol=1e-6)


def test_a_fragment_falls_back_to_the_header_with_a_warning(sample, caplog):
    img, _ = sample
    fragment = np.zeros(img.shape[1:], bool)
    fragment[40:60, 40:60, 60:63] = True  # a flat piece of bone
    with caplog.at_level(logging.WARNING, logger="scripts.frame"):
        frame = estimate_frame(fragment, img.affine.numpy())
    assert frame.source == "header" and np.array_equal(frame.rotation, np.eye(3))
    assert "header's axes" in caplog.text


def test_half_a_skull_is_not_symmetric_and_falls_back(sample, caplog):
    img, _ = sample
    half = np.asarray(img[0]) > 0
    half[: half.shape[0] // 2 + 10] = False
    with caplog.at_level(logging.WARNING, logger="scripts.frame"):
        frame = estimate_frame(half, img.affine.numpy())
    assert frame.source == "header"
    assert "mirror image" in caplog.text


def test_canonical_framed_resamples_into_a_cube_and_records_the_frame(sample):
    img, upright = sample
    out = CanonicalFramed("image", grid=64, spacing_mm=3.2, margin=4)({"image": img})
    assert out["image"].shape == (1, 72, 72, 72) and out["cube_side"] == 72
    assert out["image"].dtype == torch.uint8
    assert out["frame"]["frame"] == "skull" and len(out["frame"]["rotation_deg"]) == 3
    assert out["frame"]["seconds"] > 0
    # the cube's voxels are 3.2 mm scaled by the head's size and proportions, along the head's axes
    voxel = 3.2 * out["frame"]["head_scale"] * np.array(out["frame"]["head_proportions"])
    assert np.allclose(np.asarray(out["image"].affine)[:3, :3], upright.rotation * voxel, atol=1e-3)
    bone_ml = float(out["image"].sum()) * np.prod(voxel) / 1000
    assert bone_ml == pytest.approx(float(img.sum()) * 1.6**3 / 1000, rel=0.15)


def test_a_large_one_sided_hole_does_not_roll_the_mid_sagittal_plane():
    # a small training head (0.85x) with a parietotemporal defect: the coarse search's best plane is rolled
    # by about 42 degrees (its capped mean distance pulled by the hole); the median of the refined fits is not
    case = skullbreak_case(137, size=128, seed=0, head_scale=(0.8, 1.05), head_stretch=0.1)
    defective, _ = case.defect("parietotemporal")
    frame = estimate_frame(defective, case.affine)
    angle = np.degrees(np.arccos(abs(frame.rotation[:, 0] @ case.skull.rotation[:, 0])))
    assert frame.source == "skull" and angle < 3.0
