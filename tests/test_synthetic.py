"""Synthetic SkullBreak / SkullFix generator: layout, headers, exact implants, anatomy, seeding."""

from pathlib import Path

import matplotlib.image
import nrrd
import numpy as np
import pytest
from monai.bundle import create_workflow
from monai.data.utils import affine_to_spacing
from monai.transforms import LoadImage
from scipy import ndimage

from scripts.data.synthetic import (
    FOV_MM,
    SKULLBREAK_DEFECTS,
    generate_skullbreak,
    generate_skullfix,
    preview,
    skullbreak_case,
    skullfix_case,
)

SIZE = 48
NUM_CASES = 2
FIX_SHAPE = (SIZE, SIZE, round(SIZE * 0.6))
FULL = np.ones((3, 3, 3), dtype=bool)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_skullbreak(root, num_cases=NUM_CASES, size=SIZE, seed=0)
    generate_skullfix(root, num_cases=1, size=SIZE, seed=0)
    return root


def _read(path: Path) -> np.ndarray:
    data, header = nrrd.read(str(path))
    assert header["type"] in ("unsigned char", "uchar", "uint8", "uint8_t"), path  # NRRD's names of one type
    assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}, path
    return data.astype(bool)


def _spacing(path: Path) -> np.ndarray:
    img = LoadImage(image_only=True)(str(path))
    return np.asarray(affine_to_spacing(img.affine, r=3))


def test_skullbreak_layout(root):
    base = root / "SkullBreak"
    found = {p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()}
    ids = [f"{i:03d}.nrrd" for i in range(NUM_CASES)]
    expected = {f"complete_skull/{i}" for i in ids}
    for kind in SKULLBREAK_DEFECTS:
        expected |= {f"{folder}/{kind}/{i}" for folder in ("defective_skull", "implant") for i in ids}
    assert found == expected


def test_skullbreak_files_binary_isotropic_and_exact(root):
    base = root / "SkullBreak"
    for i in range(NUM_CASES):
        name = f"{i:03d}.nrrd"
        complete = _read(base / "complete_skull" / name)
        assert complete.shape == (SIZE,) * 3
        np.testing.assert_allclose(_spacing(base / "complete_skull" / name), [FOV_MM / SIZE] * 3, rtol=1e-6)
        bone = complete.sum()
        for kind in SKULLBREAK_DEFECTS:
            defective = _read(base / "defective_skull" / kind / name)
            implant = _read(base / "implant" / kind / name)
            assert np.array_equal(complete, defective | implant), (kind, name)
            assert not (defective & implant).any(), (kind, name)
            assert 0.03 <= implant.sum() / bone <= 0.20, (kind, name, implant.sum() / bone)
            assert ndimage.label(implant, FULL)[1] == 1, (kind, name)
        np.testing.assert_allclose(_spacing(base / "implant" / kind / name), [FOV_MM / SIZE] * 3, rtol=1e-6)


def test_defect_classes_differ_and_sit_where_named():
    case = skullbreak_case(0, SIZE, seed=0)
    implants = {kind: case.defect(kind)[1] for kind in SKULLBREAK_DEFECTS}
    centres = {kind: np.argwhere(m).mean(0) for kind, m in implants.items()}
    mid = np.argwhere(case.complete).mean(0)
    for a in SKULLBREAK_DEFECTS:
        for b in SKULLBREAK_DEFECTS:
            if a < b:
                assert not np.array_equal(implants[a], implants[b])
    # axis 0 left->right, 1 posterior->anterior, 2 inferior->superior
    bilateral = implants["bilateral"]
    assert centres["bilateral"][2] > mid[2] and bilateral[: int(mid[0])].any() and bilateral[int(mid[0]) :].any()
    assert centres["frontoorbital"][1] > mid[1] + 0.25 * SIZE
    assert abs(centres["parietotemporal"][0] - mid[0]) > 0.2 * SIZE


def test_shell_with_open_base():
    complete = skullbreak_case(1, SIZE, seed=0).complete
    assert ndimage.label(complete, FULL)[1] == 1
    faces = [complete[0], complete[-1], complete[:, 0], complete[:, -1], complete[:, :, 0], complete[:, :, -1]]
    assert not any(f.any() for f in faces), "skull must fit inside the field of view"
    lo, hi = np.argwhere(complete).min(0), np.argwhere(complete).max(0)
    extent_mm = (hi - lo + 1) * FOV_MM / SIZE
    assert 165 < extent_mm[1] < 200 and 130 < extent_mm[0] < 160 and 120 < extent_mm[2] < 160
    cx, cy, cz = (lo + hi) // 2
    assert not complete[cx - 3 : cx + 4, cy - 3 : cy + 4, cz - 3 : cz + 4].any(), "centre of the head is empty"
    column = np.nonzero(complete[cx, cy])[0]  # vertical line through the middle of the head
    assert column.min() > cz, "no bone under the brain: the base is open"
    assert column.max() - column.min() + 1 >= 2, "vertex bone at least 2 voxels thick"
    for line in (complete[:, cy, cz], complete[cx, :, cz]):  # through both sides at mid height
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, line.astype(int), 0])))[::2]
        assert len(runs) == 2 and runs.min() >= 2


def test_deterministic_and_seeded(root):
    a, b = skullbreak_case(1, SIZE, seed=0), skullbreak_case(1, SIZE, seed=0)
    assert np.array_equal(a.complete, b.complete)
    for kind in ("frontoorbital", "random_2"):
        implant = a.defect(kind)[1]
        assert np.array_equal(implant, b.defect(kind)[1])
        # the written case 001 (generated with 2 cases and all classes) is the same case
        assert np.array_equal(implant, _read(root / "SkullBreak" / "implant" / kind / "001.nrrd"))
    assert np.array_equal(a.complete, _read(root / "SkullBreak" / "complete_skull" / "001.nrrd"))
    for other in (skullbreak_case(1, SIZE, seed=1), skullbreak_case(0, SIZE, seed=0)):
        assert (other.complete != a.complete).mean() > 0.005


def test_skullfix_anisotropic_and_exact(root):
    base = root / "SkullFix"
    found = {p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()}
    folders = ("complete_skull", "defective_skull", "implant")
    assert found == {f"{folder}/000.nrrd" for folder in folders}
    complete, defective, implant = (_read(base / folder / "000.nrrd") for folder in folders)
    assert complete.shape == FIX_SHAPE
    spacing = _spacing(base / "implant" / "000.nrrd")
    np.testing.assert_allclose(spacing, [FOV_MM / n for n in FIX_SHAPE], rtol=1e-6)
    assert spacing[2] > 1.5 * spacing[0]
    assert np.array_equal(complete, defective | implant) and not (defective & implant).any()
    assert 0.03 <= implant.sum() / complete.sum() <= 0.20
    assert ndimage.label(implant, FULL)[1] == 1
    assert np.array_equal(implant, skullfix_case(0, SIZE, seed=0).defect("skullfix")[1])


@pytest.mark.filterwarnings("ignore:parsing config_file")
def test_bundle_config_runs(tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "synthetic.json"
    workflow = create_workflow(config_file=str(config), root=str(tmp_path), num_cases=1, size=32, defects=["random_1"])
    workflow.run()
    assert (tmp_path / "SkullBreak" / "implant" / "random_1" / "000.nrrd").is_file()
    assert (tmp_path / "SkullFix" / "implant" / "000.nrrd").is_file()
    assert _spacing(tmp_path / "SkullFix" / "implant" / "000.nrrd")[2] == pytest.approx(FOV_MM / 19)


def test_preview_png(root, tmp_path):
    out = preview(root, tmp_path / "p.png", case=1, defect="parietotemporal")
    image = matplotlib.image.imread(out)[..., :3]
    assert image.shape[0] > 300 and image.shape[1] > 600
    red = (image[..., 0] > 0.6) & (image[..., 1] < 0.3) & (image[..., 2] < 0.3)
    assert red.sum() > 100, "implant drawn in red"
    single = preview(root / "SkullFix" / "complete_skull" / "000.nrrd", tmp_path / "s.png")
    assert Path(single).is_file()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="size"):
        skullbreak_case(0, size=16)
    with pytest.raises(ValueError, match="num_cases"):
        generate_skullfix(tmp_path, num_cases=0, size=SIZE)
    with pytest.raises(ValueError, match="frontal"):
        generate_skullbreak(tmp_path, num_cases=1, size=SIZE, defects=("frontal",))
    with pytest.raises(ValueError, match="sideways"):
        skullbreak_case(0, SIZE).defect("sideways")
    with pytest.raises(FileNotFoundError, match="defective_skull"):
        preview(tmp_path, tmp_path / "x.png")


def test_heads_can_be_smaller_or_of_other_proportions_without_changing_the_default_heads():
    """``head_scale`` / ``head_stretch`` widen the heads from a random stream of their own: the default
    skull is the same as without them, a 0.8 scale shrinks every extent by about 0.8 (bone thickness
    stays), and the defect classes still cut a defect out of the smaller head."""
    from scripts.data.synthetic import skullbreak_case

    extent = lambda mask: np.ptp(np.argwhere(mask), axis=0).astype(float)  # noqa: E731
    default = skullbreak_case(1, size=64, seed=0)
    assert np.array_equal(default.complete, skullbreak_case(1, size=64, seed=0, head_scale=None).complete)
    small = skullbreak_case(1, size=64, seed=0, head_scale=(0.8, 0.8))
    np.testing.assert_allclose(extent(small.complete) / extent(default.complete), 0.8, atol=0.04)
    stretched = skullbreak_case(1, size=64, seed=0, head_stretch=0.1)
    ratio = extent(stretched.complete) / extent(default.complete)
    assert np.all((ratio > 0.86) & (ratio < 1.14)) and not np.allclose(ratio, 1.0, atol=0.01)
    defective, implant = small.defect("bilateral")
    assert implant.sum() > 500 and not (defective & implant).any()
