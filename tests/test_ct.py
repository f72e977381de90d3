"""CT input (scripts/ct.py): skull mask from Hounsfield units, table and noise removal, auto detection."""

import logging
from pathlib import Path

import numpy as np
import pytest

from scripts.ct import load_skull
from scripts.data.synthetic import synthetic_ct
from scripts.io import MaskError, load_mask, save_mask

SAMPLE = Path(__file__).resolve().parents[1] / "sample" / "defective_skull.nrrd"


@pytest.fixture(scope="module")
def skull():
    return load_mask(SAMPLE)


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory, skull):
    """The sample skull as a synthetic head CT (int16 HU, CT table, noise specks) in NIfTI and NRRD."""
    ct = synthetic_ct(np.asarray(skull[0]) > 0)
    folder = tmp_path_factory.mktemp("ct")
    return [save_mask(folder / f"head_ct{suffix}", ct, skull.affine, dtype=np.int16) for suffix in (".nii.gz", ".nrrd")]


@pytest.mark.parametrize("index, input_type", [(0, "auto"), (1, "auto"), (1, "CT")])
def test_ct_gives_the_skull_without_table_and_noise(ct_files, skull, index, input_type, caplog):
    with caplog.at_level(logging.INFO, logger="scripts.ct"):
        mask, kind = load_skull(ct_files[index], input_type)
    assert kind == "ct" and mask.dtype == skull.dtype
    np.testing.assert_array_equal(np.asarray(mask[0]), np.asarray(skull[0]))  # exactly the skull
    np.testing.assert_allclose(np.asarray(mask.affine), np.asarray(skull.affine), atol=1e-6)
    assert "bone >= 150 HU" in caplog.text and "dropped" in caplog.text
    assert ("read as a CT in Hounsfield units (--input_type auto)" in caplog.text) == (input_type == "auto")


def test_mask_input_is_detected_and_ct_refused_as_mask(ct_files, caplog):
    with caplog.at_level(logging.INFO, logger="scripts.ct"):
        mask, kind = load_skull(SAMPLE)
    assert kind == "mask" and "read as a binary skull mask" in caplog.text
    with pytest.raises(MaskError, match=r"head_ct.nii.gz: not a binary mask"):
        load_skull(ct_files[0], "mask")


def test_ct_errors_name_the_file_and_the_problem(ct_files, tmp_path):
    with pytest.raises(MaskError, match=r"head_ct.nrrd: no voxel at or above the bone threshold 3000 HU"):
        load_skull(ct_files[1], "ct", bone_threshold_hu=3000)
    with pytest.raises(ValueError, match=r"--input_type: expected one of auto, mask, ct, got 'mri'"):
        load_skull(ct_files[1], "mri")
    with pytest.raises(ValueError, match=r"--bone_threshold_hu: expected a number \(HU\), got 'bone'"):
        load_skull(ct_files[1], "ct", bone_threshold_hu="bone")
    labels = save_mask(tmp_path / "labels.nrrd", np.asarray(load_mask(SAMPLE)[0]) * 3, np.eye(4))
    with pytest.raises(MaskError, match=r"labels.nrrd: not a binary mask, values \{0, 3\}"):
        load_skull(labels)  # neither a mask nor a CT (no air values)


def test_higher_threshold_keeps_less_bone(ct_files, skull):
    mask, _ = load_skull(ct_files[0], "ct", bone_threshold_hu=900)
    kept = np.asarray(mask[0]) > 0
    assert 0 < kept.sum() < np.asarray(skull[0]).sum() and not (kept & ~(np.asarray(skull[0]) > 0)).any()
