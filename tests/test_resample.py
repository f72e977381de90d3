"""Binary masks between grids: into a rotated cube and back onto the exact input grid; the training cube."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ResampleToMatch
from scipy.spatial.transform import Rotation

from scripts.data.resample import pad_to_cube, reach, to_original_grid
from scripts.frame import to_canonical
from scripts.io import load_mask, save_mask

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


def _cube_affine(img: MetaTensor, side: int, spacing: float, rotation: np.ndarray) -> np.ndarray:
    """A rotated cube of ``side`` voxels of ``spacing`` mm centred on ``img``'s field of view."""
    centre = img.affine.numpy() @ np.append((np.asarray(img.shape[1:]) - 1) / 2, 1.0)
    affine = np.eye(4)
    affine[:3, :3] = rotation * spacing
    affine[:3, 3] = centre[:3] - affine[:3, :3] @ np.full(3, (side - 1) / 2)
    return affine


def _dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("angle", [0.0, 0.4])
def test_a_rotated_cube_and_back_gives_the_exact_input_grid(angle):
    img = _sphere(angle)
    rotation = Rotation.from_euler("xyz", (20, -10, 35), degrees=True).as_matrix()
    cube = to_canonical(img, _cube_affine(img, 48, 0.5, rotation), 48)
    assert cube.shape == (1, 48, 48, 48) and cube.dtype == torch.uint8
    assert set(torch.unique(cube).tolist()) == {0, 1}
    assert float(cube.sum()) * 0.125 == pytest.approx(float(img.sum()) * np.prod(SPACING), rel=0.05)  # mm^3
    back = to_original_grid(cube, img)
    assert back.shape == img.shape and back.dtype == torch.uint8
    assert torch.equal(back.affine, img.affine)
    assert _dice(back, img) > 0.95
    # float maps (e.g. ensemble variance) keep their values
    var = to_original_grid(cube.float() * 0.25, img, binary=False)
    assert var.dtype == torch.float32 and float(var.max()) == pytest.approx(0.25)


def test_the_way_back_is_computed_in_the_implants_box_only():
    """to_original_grid resamples only the box the mask's voxels reach (reach): the same voxels as resampling
    the whole grid, and an empty mask gives an empty result without any resampling."""
    img = _sphere(0.4)
    rotation = Rotation.from_euler("xyz", (20, -10, 35), degrees=True).as_matrix()
    cube = to_canonical(img, _cube_affine(img, 48, 0.5, rotation), 48)
    cube[:, :, :, :34] = 0  # a cap of the sphere, as an implant is a piece of the skull
    whole = ResampleToMatch(mode="bilinear", padding_mode="border")(cube.float(), img_dst=img) >= 0.5
    back = to_original_grid(cube, img)
    assert int(back.sum()) > 100 and int((back.bool() != whole.bool()).sum()) <= 0.001 * int(back.sum())
    box = reach(cube, img)
    assert np.prod([b.stop - b.start for b in box]) < 0.6 * np.prod(img.shape)
    assert not back[(slice(None), *box)].logical_not().all() and int(back.sum()) == int(back[(slice(None), *box)].sum())
    kept = to_original_grid(cube, img, exclude=img)  # what overlaps the reference's own mask is left out
    assert int(kept.sum()) == int((back.bool() & (img == 0)).sum())
    empty = torch.zeros_like(cube)
    assert reach(empty, img) is None and int(to_original_grid(empty, img).sum()) == 0


def test_a_coarser_cube_still_maps_back():
    img = _sphere(0.4)
    cube = to_canonical(img, _cube_affine(img, 32, 0.8, np.eye(3)), 32)
    back = to_original_grid(cube, img)
    assert back.shape == img.shape and torch.equal(back.affine, img.affine)
    assert _dice(back, img) > 0.9  # a 0.8 mm grid loses detail, but the sphere is kept


def test_pad_to_cube_keeps_every_voxel_and_follows_with_the_affine():
    img = _sphere(0.0)
    cube = pad_to_cube(img, 48)
    assert cube.shape == (1, 48, 48, 48) and int(cube.sum()) == int(img.sum())
    assert _dice(to_original_grid(cube, img), img) == 1.0
    with pytest.raises(ValueError, match="larger than the cube"):
        pad_to_cube(img, 32)


def test_file_round_trip_through_a_rotated_cube(tmp_path):
    """Load an anisotropic file -> rotated cube -> back -> save: the written file has the input grid."""
    src = save_mask(tmp_path / "in.nrrd", _sphere(0.4)[0], _sphere(0.4).affine)
    img = load_mask(src)
    rotation = Rotation.from_euler("z", 30, degrees=True).as_matrix()
    cube = to_canonical(img, _cube_affine(img, 48, 0.5, rotation), 48)
    out = save_mask(tmp_path / "out.nrrd", to_original_grid(cube, img), reference=img)
    written = load_mask(out)
    assert written.shape == img.shape
    np.testing.assert_allclose(written.affine.numpy(), img.affine.numpy(), atol=1e-12)
    assert _dice(written, img) > 0.95
