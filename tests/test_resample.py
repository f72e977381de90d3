"""Isotropic resampling and the exact way back to the original grid."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.data.resample import crop_from_cube, pad_to_cube, to_isotropic, to_original_grid
from scripts.io import is_isotropic, load_mask, mask_spacing, save_mask

SPACING = np.array([0.5, 0.5, 1.25])
SHAPE = (40, 36, 18)


def _sphere(angle=0.0):
    """Anisotropic sphere mask (1, X, Y, Z); a non-zero ``angle`` rotates and flips the direction."""
    c, s = np.cos(angle), np.sin(angle)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([-1.0, 1.0, 1.0]) if angle else np.eye(3)
    aff = np.eye(4)
    aff[:3, :3] = direction * SPACING
    aff[:3, 3] = [12.0, -7.0, 30.0]
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    centre = (np.array(SHAPE) - 1) * SPACING / 2 + [0.3, -0.2, 0.4]  # off-grid centre
    mask = (np.linalg.norm(idx * SPACING - centre, axis=-1) < 8.2).astype(np.uint8)
    return MetaTensor(torch.from_numpy(mask)[None], affine=torch.from_numpy(aff))


def _dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("angle", [0.0, 0.4])
def test_isotropic_and_back_is_exact_grid(angle):
    img = _sphere(angle)
    iso = to_isotropic(img)
    assert is_isotropic(iso) and not is_isotropic(img)
    np.testing.assert_allclose(mask_spacing(iso), 0.5)
    assert iso.dtype == torch.uint8 and set(torch.unique(iso).tolist()) == {0, 1}
    assert iso.shape[1:3] == img.shape[1:3] and iso.shape[3] > img.shape[3]
    # direction cosines and origin are kept
    np.testing.assert_allclose(iso.affine[:3, :3] / 0.5, img.affine[:3, :3] / SPACING, atol=1e-9)
    np.testing.assert_allclose(iso.affine[:3, 3], img.affine[:3, 3], atol=1e-9)

    back = to_original_grid(iso, img)
    assert back.shape == img.shape and back.dtype == torch.uint8
    assert torch.equal(back.affine, img.affine)
    assert _dice(back, img) > 0.97


def test_coarser_target_spacing_still_maps_back():
    img = _sphere(0.4)
    iso = to_isotropic(img, spacing_mm=0.8)
    np.testing.assert_allclose(mask_spacing(iso), 0.8)
    back = to_original_grid(iso, img)
    assert back.shape == img.shape and torch.equal(back.affine, img.affine)
    assert _dice(back, img) > 0.9  # a 0.8 mm grid loses detail, but the sphere is kept
    with pytest.raises(ValueError, match="spacing_mm"):
        to_isotropic(img, spacing_mm=0.0)


def test_pad_to_cube_and_exact_crop_back():
    img = _sphere(0.4)
    iso = to_isotropic(img)
    cube = pad_to_cube(iso, 64)
    assert cube.shape == (1, 64, 64, 64)
    assert int(cube.sum()) == int(iso.sum())
    crop = crop_from_cube(cube, iso)
    assert torch.equal(crop.as_tensor(), iso.as_tensor()) and torch.equal(crop.affine, iso.affine)
    # straight from the padded cube to the original anisotropic grid
    back = to_original_grid(cube, img)
    assert back.shape == img.shape and torch.equal(back.affine, img.affine)
    assert _dice(back, img) > 0.97
    # float maps (e.g. ensemble variance) keep their values
    var = to_original_grid(cube.float() * 0.25, img, binary=False)
    assert var.dtype == torch.float32 and float(var.max()) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="larger than the cube"):
        pad_to_cube(iso, 32)
    with pytest.raises(ValueError, match="not a sub-grid"):
        crop_from_cube(iso, cube)
    with pytest.raises(ValueError, match="spacing or direction"):
        crop_from_cube(cube, img)


def test_file_round_trip_through_isotropic_grid(tmp_path):
    """Load anisotropic file -> isotropic -> back -> save: the written file has the input grid."""
    src = save_mask(tmp_path / "in.nrrd", _sphere(0.4)[0], _sphere(0.4).affine)
    img = load_mask(src)
    out = save_mask(tmp_path / "out.nrrd", to_original_grid(pad_to_cube(to_isotropic(img), 64), img), reference=img)
    written = load_mask(out)
    assert written.shape == img.shape
    np.testing.assert_allclose(written.affine.numpy(), img.affine.numpy(), atol=1e-12)
    assert _dice(written, img) > 0.97
