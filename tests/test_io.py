"""Mask I/O: geometry-preserving round trips, validation errors, atomic and non-clobbering writes."""

import os

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImage, LoadImaged

from scripts.io import (
    MaskError,
    ValidateMaskd,
    atomic_folder,
    is_isotropic,
    load_mask,
    mask3d,
    mask_spacing,
    read_nrrd,
    save_mask,
    volume3d,
)


def _affine(spacing=(0.5, 0.6, 2.0), origin=(12.5, -30.0, 41.0), angle=0.3):
    """RAS affine with anisotropic spacing, non-zero origin, a rotation and a flipped axis."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([-1.0, 1.0, 1.0])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def _mask(shape=(12, 10, 8), seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) > 0.6).astype(np.uint8)


def _nrrd_header(spacing, origin=(1.0, 2.0, 3.0)):
    return {"space": "left-posterior-superior", "space directions": np.diag(spacing), "space origin": np.array(origin)}


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".nii"])
def test_round_trip_keeps_data_and_geometry(tmp_path, suffix):
    mask, aff = _mask(), _affine()
    path = save_mask(tmp_path / f"case{suffix}", mask, aff)
    loaded = load_mask(path)
    assert loaded.shape == (1, *mask.shape) and loaded.dtype == torch.uint8
    np.testing.assert_array_equal(loaded[0].numpy(), mask)
    got = loaded.affine.numpy()
    np.testing.assert_allclose(mask_spacing(loaded), [0.5, 0.6, 2.0], atol=1e-6)  # spacing
    np.testing.assert_allclose(got[:3, 3], aff[:3, 3], atol=1e-5)  # origin
    np.testing.assert_allclose(got[:3, :3] / mask_spacing(loaded), aff[:3, :3] / [0.5, 0.6, 2.0], atol=1e-6)
    assert not is_isotropic(loaded)
    # the plain MONAI reader sees the same grid, so configs using LoadImaged agree with load_mask
    plain = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    np.testing.assert_allclose(plain.affine.numpy(), got, atol=1e-12)


@pytest.mark.parametrize("encoding, dtype", [("raw", np.int16), ("gzip", np.int16), ("bzip2", np.uint8), ("gzip", np.float32)])
def test_nrrd_is_read_once_in_its_own_dtype_as_monai_reads_it(tmp_path, encoding, dtype):
    """read_nrrd (one bounded decompression) gives the file's dtype and MONAI's LoadImage voxels and affine, for raw,
    gzip and bzip2 data, big-endian data and a byte skip."""
    values = (np.random.default_rng(0).random((12, 10, 8)) * 2000 - 1000).astype(dtype)
    for endian, skip in (("little", 0), ("big", 0), ("little", 5)):
        if skip and encoding != "raw":
            continue  # a byte skip of compressed data counts decompressed bytes; raw data shows the mechanism
        path = tmp_path / f"ct_{endian}_{skip}.nrrd"
        header = {**_nrrd_header((0.5, 0.6, 2.0)), "encoding": encoding, "endian": endian}
        nrrd.write(str(path), values, header)
        if skip:  # the data begins after 5 bytes of padding
            head, data = path.read_bytes().split(b"\n\n", 1)
            path.write_bytes(head + b"\nbyte skip: 5\n\n" + b"\0" * 5 + data)
        loaded = read_nrrd(path)
        plain = LoadImage(image_only=True, ensure_channel_first=True, dtype=None)(str(path))
        assert loaded.dtype == torch.from_numpy(np.zeros(1, dtype)).dtype and loaded.shape == (1, 12, 10, 8)
        np.testing.assert_array_equal(loaded[0].numpy(), values)
        np.testing.assert_array_equal(loaded[0].numpy(), plain[0].numpy().astype(dtype))
        np.testing.assert_allclose(loaded.affine.numpy(), plain.affine.numpy(), atol=1e-12)
    text = tmp_path / "text.nrrd"  # text encodings hold no more values than the file: pynrrd reads them
    nrrd.write(str(text), values, {**_nrrd_header((0.5, 0.6, 2.0)), "encoding": "ascii"})
    np.testing.assert_array_equal(read_nrrd(text)[0].numpy(), values)
    truncated = tmp_path / "short.nrrd"
    nrrd.write(str(truncated), values, {**_nrrd_header((1.0, 1.0, 1.0)), "encoding": "raw"})
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(MaskError, match=rf"^{truncated}: cannot read image data \(only"):
        read_nrrd(truncated)


def test_reference_affine_and_float_maps(tmp_path):
    ref = MetaTensor(torch.from_numpy(_mask())[None], affine=torch.from_numpy(_affine(spacing=(0.4, 0.4, 0.4))))
    variance = np.random.default_rng(1).random(ref.shape[1:]).astype(np.float32)
    path = save_mask(tmp_path / "var.nrrd", torch.from_numpy(variance)[None], reference=ref, dtype=np.float32)
    back = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    assert back.dtype == torch.float32
    np.testing.assert_array_equal(back[0].numpy(), variance)
    np.testing.assert_allclose(back.affine.numpy(), ref.affine.numpy(), atol=1e-12)
    assert is_isotropic(back)


def test_0_255_mask_is_mapped_to_binary(tmp_path):
    mask = _mask()
    loaded = load_mask(save_mask(tmp_path / "m.nrrd", mask * 255, _affine()))
    np.testing.assert_array_equal(loaded[0].numpy(), mask)


def test_atomic_write_and_overwrite_refusal(tmp_path):
    path = save_mask(tmp_path / "sub" / "m.nii.gz", _mask(seed=1), _affine())
    with pytest.raises(FileExistsError, match="m.nii.gz"):
        save_mask(path, _mask(seed=2), _affine())
    np.testing.assert_array_equal(load_mask(path)[0].numpy(), _mask(seed=1))
    save_mask(path, _mask(seed=2), _affine(), overwrite=True)
    np.testing.assert_array_equal(load_mask(path)[0].numpy(), _mask(seed=2))
    assert [p.name for p in path.parent.iterdir()] == ["m.nii.gz"]  # no temp files left behind
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # normal permissions, not mkstemp's 0600
    with pytest.raises(ValueError, match="invertible"):  # failed write leaves nothing either
        save_mask(tmp_path / "sub" / "bad.nrrd", _mask(), np.diag([1.0, 0.0, 1.0, 1.0]))
    assert [p.name for p in path.parent.iterdir()] == ["m.nii.gz"]


def test_atomic_folder_has_normal_permissions_and_leaves_nothing_on_error(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    with atomic_folder(tmp_path / "out" / "case") as tmp:
        (tmp / "a.txt").write_text("a")
        assert not (tmp_path / "out" / "case").exists()  # invisible until complete
    case = tmp_path / "out" / "case"
    assert case.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    with pytest.raises(FileExistsError, match="case"):
        with atomic_folder(case):
            pass
    with pytest.raises(RuntimeError):
        with atomic_folder(case, overwrite=True) as tmp:
            (tmp / "b.txt").write_text("b")
            raise RuntimeError("crash while writing")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["case"] and (case / "a.txt").is_file()
    with atomic_folder(case, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert [p.name for p in case.iterdir()] == ["b.txt"]


def _write_bad_files(d):
    """name -> expected message fragment, for every rejected input."""
    good = _mask((8, 9, 10))
    nrrd.write(str(d / "two_d.nrrd"), good[..., 0], _nrrd_header((0.5, 0.6), (1.0, 2.0)))
    directions = np.array([[np.nan] * 3, [0.5, 0, 0], [0, 0.6, 0], [0, 0, 2.0]])
    header = {**_nrrd_header((1, 1, 1)), "space directions": directions}
    nrrd.write(str(d / "four_d.nrrd"), np.stack([good, good]), header)
    nib.save(nib.Nifti1Image(np.stack([good, good], -1), np.eye(4)), str(d / "four_d.nii.gz"))
    nib.save(nib.Nifti1Image(good[..., 0], np.eye(4)), str(d / "two_d.nii.gz"))
    (d / "text.nrrd").write_text("just some text\n")
    (d / "text.nii.gz").write_text("just some text\n")
    save_mask(d / "truncated.nrrd", good, np.eye(4))
    (d / "truncated.nrrd").write_bytes((d / "truncated.nrrd").read_bytes()[:-20])
    nrrd.write(str(d / "no_spacing.nrrd"), good)
    nrrd.write(str(d / "zero_spacing.nrrd"), good, _nrrd_header((0.5, 0.0, 2.0)))
    save_mask(d / "empty.nrrd", np.zeros_like(good), np.eye(4))
    save_mask(d / "labels.nii.gz", good + (np.arange(good.size).reshape(good.shape) % 7 == 0), np.eye(4))
    return {
        "missing.nrrd": "not found",
        "mask.mha": "unsupported file type",
        "two_d.nrrd": "2D",
        "two_d.nii.gz": "2D",
        "four_d.nrrd": "4D",
        "four_d.nii.gz": "4D",
        "text.nrrd": "not a readable",
        "text.nii.gz": "not a readable",
        "truncated.nrrd": "cannot read",
        "no_spacing.nrrd": "no voxel spacing",
        "zero_spacing.nrrd": "non-positive voxel spacing",
        "empty.nrrd": "empty mask",
        "labels.nii.gz": r"not a binary mask, values \{0, 1, 2\}",
    }


def test_load_mask_errors_name_file_and_problem(tmp_path):
    (tmp_path / "mask.mha").write_text("")
    for name, problem in _write_bad_files(tmp_path).items():
        with pytest.raises(MaskError, match=problem) as info:
            load_mask(tmp_path / name)
        assert name in str(info.value)


def test_validate_maskd_in_compose(tmp_path):
    good = save_mask(tmp_path / "good.nrrd", _mask() * 255, _affine())
    labels = save_mask(tmp_path / "labels.nrrd", _mask() * 3, _affine())
    chain = Compose([LoadImaged("mask"), EnsureChannelFirstd("mask"), ValidateMaskd("mask")])
    out = chain({"mask": str(good)})["mask"]
    assert out.dtype == torch.uint8 and out.shape == (1, 12, 10, 8)
    np.testing.assert_array_equal(out[0].numpy(), _mask())
    with pytest.raises(RuntimeError) as info:  # MONAI's Compose re-raises with the cause attached
        chain({"mask": str(labels)})
    assert isinstance(info.value.__cause__, MaskError)
    assert "labels.nrrd: not a binary mask" in str(info.value.__cause__)
    flat = MetaTensor(torch.ones(1, 4, 4, 4), affine=torch.diag(torch.tensor([1.0, 0.0, 1.0, 1.0])))
    with pytest.raises(MaskError, match="spacing"):
        ValidateMaskd("m")({"m": flat})


def test_volume3d_and_mask3d_accept_channel_first_and_name_bad_shapes():
    vol = torch.zeros(1, 4, 5, 6)
    vol[0, 1, 2, 3] = 2.5
    assert volume3d(vol, "v").shape == (4, 5, 6)
    m = mask3d(vol.numpy(), "v")
    assert m.dtype == bool and m.sum() == 1 and m[1, 2, 3]
    with pytest.raises(ValueError, match=r"skull: expected an \(X, Y, Z\) or \(1, X, Y, Z\) volume, got shape \(2, 4, 5, 6\)"):
        mask3d(torch.zeros(2, 4, 5, 6), "skull")
