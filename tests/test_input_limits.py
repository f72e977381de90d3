"""Inputs too large for memory are refused from their header, before any voxel buffer is allocated
(scripts.io.check_input_size, via scripts.ct.LoadSkulld and the inference config's ``max_input_voxels``)."""

import gzip
import resource

import numpy as np
import pytest
from monai.bundle import ConfigParser

from scripts.cli import root_cause
from scripts.ct import LoadSkulld
from scripts.io import MAX_INPUT_VOXELS, PEAK_BYTES_PER_VOXEL, MaskError, load_mask, save_mask
from tests.test_untrusted_weights import ROOT


def nrrd_file(path, sizes, payload: bytes, encoding="gzip", extra="", kind="uint8"):
    """An NRRD with the given header sizes, value type and (already encoded) payload."""
    header = (f"NRRD0004\ntype: {kind}\ndimension: {len(sizes)}\nspace: left-posterior-superior\n"
              f"sizes: {' '.join(map(str, sizes))}\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
              f"encoding: {encoding}\nspace origin: (0,0,0)\n{extra}\n")
    path.write_bytes(header.encode() + payload)
    return path


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_the_default_limit_is_24_gb_over_the_peak_factor():
    assert MAX_INPUT_VOXELS * PEAK_BYTES_PER_VOXEL == 24 * 1024**3 and MAX_INPUT_VOXELS > 512 * 512 * 1000


def test_a_header_claiming_4000_cubed_is_refused_before_allocation(tmp_path):
    path = nrrd_file(tmp_path / "huge.nrrd", (4000, 4000, 4000), gzip.compress(bytes(64)))
    before = peak_mb()
    with pytest.raises(MaskError, match=rf"^{path}: header claims 4000 x 4000 x 4000 = 64,000,000,000 voxels, "
                                        r"over the limit of 805,306,368 \(--max_input_voxels\); refused before loading$"):
        LoadSkulld(keys="image")({"image": str(path)})
    assert peak_mb() - before < 100


def test_data_that_really_inflates_past_the_limit_is_refused_without_inflating(tmp_path):
    """A gzip of zeros whose header honestly states 64^3 voxels, under a limit lowered to 100,000."""
    path = nrrd_file(tmp_path / "zeros.nrrd", (64, 64, 64), gzip.compress(bytes(64**3)))
    with pytest.raises(MaskError, match=rf"^{path}: header claims .* over the limit of 100,000"):
        LoadSkulld(keys="image", max_input_voxels=100_000)({"image": str(path)})
    load = LoadSkulld(keys="image", max_input_voxels=64**3)  # at the limit it is read (and is an empty mask)
    with pytest.raises(MaskError, match=rf"^{path}: empty mask"):
        load({"image": str(path)})


@pytest.mark.parametrize("encoding, compress", [("gzip", gzip.compress), ("bzip2", __import__("bz2").compress)])
def test_a_small_header_over_a_decompression_bomb_is_refused_without_inflating(tmp_path, encoding, compress):
    """8^3 voxels claimed, 300 MB of zeros compressed to a few hundred KB: pynrrd would inflate it all."""
    path = nrrd_file(tmp_path / "bomb.nrrd", (8, 8, 8), compress(bytes(300_000_000), 1), encoding)
    before = peak_mb()
    with pytest.raises(MaskError, match=rf"^{path}: {encoding} data inflates beyond the 512 bytes its header claims; "
                                        r"refused before loading$"):
        load_mask(path)
    assert peak_mb() - before < 100


def test_detached_nrrd_data_is_refused(tmp_path):
    path = nrrd_file(tmp_path / "detached.nrrd", (4, 4, 4), b"", "raw", "data file: /etc/hostname\n")
    with pytest.raises(MaskError, match=rf"^{path}: detached NRRD data"):
        load_mask(path)


@pytest.mark.parametrize("kind, size", [("uint8", 1), ("signed short", 2), ("float", 4), ("unsigned long long", 8)])
def test_the_header_sizes_the_voxel_data_for_every_number_type(tmp_path, kind, size):
    """Raw data one byte short of what the header's type and sizes give is refused, exactly enough is read."""
    endian = "endian: little\n" if size > 1 else ""
    path = nrrd_file(tmp_path / "short.nrrd", (4, 4, 4), bytes(64 * size - 1), "raw", endian, kind)
    with pytest.raises(MaskError, match=rf"^{path}: cannot read image data \(only {64 * size - 1} of {64 * size} bytes\)"):
        load_mask(path)
    path = nrrd_file(tmp_path / "empty.nrrd", (4, 4, 4), bytes(64 * size), "raw", endian, kind)
    with pytest.raises(MaskError, match=rf"^{path}: empty mask"):
        load_mask(path)


def test_a_block_type_nrrd_is_refused_naming_the_type(tmp_path):
    path = nrrd_file(tmp_path / "block.nrrd", (4, 4, 4), bytes(256), "raw", "block size: 4\n", kind="block")
    with pytest.raises(MaskError, match=rf"^{path}: NRRD type 'block' is not a number type this bundle reads$"):
        load_mask(path)


def test_a_real_mask_under_the_limit_loads(tmp_path):
    mask = np.zeros((16, 16, 16), np.uint8)
    mask[4:12, 4:12, 4:12] = 1
    for name in ("m.nrrd", "m.nii.gz"):
        assert int(load_mask(save_mask(tmp_path / name, mask, np.eye(4)), max_voxels=16**3).sum()) == 512


def test_max_input_voxels_is_a_key_of_the_inference_config(tmp_path):
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT)})
    assert parser.get_parsed_content("max_input_voxels") == MAX_INPUT_VOXELS
    parser.update({"max_input_voxels": "lots"})
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("preprocessing")
    assert str(root_cause(err.value)) == "--max_input_voxels: expected a positive whole number of voxels, got 'lots'"
