"""STL export (written, read back with Open3D and by parsing the bytes) and the preview PNG."""

import numpy as np
import open3d as o3d
import pytest
from matplotlib.image import imread
from scipy.special import ndtr

from scripts.outputs import UNSURE_MM, mask_to_mesh, save_preview, save_stl, wrong_thickness, write_stl

N = 32


def sphere(n=N, radius=9.0, centre=(14.0, 16.0, 15.5)):
    g = np.indices((n, n, n), dtype=np.float64)
    return np.sqrt(sum((g[i] - centre[i]) ** 2 for i in range(3))) <= radius


def affine(spacing=(0.5, 0.8, 1.2), origin=(-40.0, 25.0, 7.5), flip_x=False):
    a = np.diag([*spacing, 1.0])
    if flip_x:
        a[0, 0] = -a[0, 0]
    a[:3, 3] = origin
    return a


def read_binary_stl(path):
    """(header bytes, normals (F, 3), triangles (F, 3, 3)) parsed from a binary STL."""
    raw = open(path, "rb").read()
    count = int(np.frombuffer(raw, "<u4", 1, 80)[0])
    rec = np.dtype([("n", "<f4", (3,)), ("v", "<f4", (3, 3)), ("a", "<u2")])
    assert len(raw) == 84 + count * rec.itemsize
    data = np.frombuffer(raw, rec, count, 84)
    return raw[:80], data["n"], data["v"].astype(np.float64)


def signed_volume(tri):
    return np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6


@pytest.mark.parametrize("flip_x", [False, True])
def test_stl_roundtrip_closed_outward_in_mm(tmp_path, flip_x):
    mask = sphere()
    a = affine(flip_x=flip_x)
    path = save_stl(tmp_path / "sphere.stl", mask, a, coordinate_system="RAS")
    header, normals, tri = read_binary_stl(path)
    assert b"SPACE=RAS" in header

    # vertices in mm: the mesh spans the mask's voxel extent (+- half a voxel) mapped through the affine
    idx = np.argwhere(mask)
    corners = np.array([[x, y, z, 1.0] for x in (0, 1) for y in (0, 1) for z in (0, 1)])
    lo_hi = np.stack([idx.min(0) - 0.5, idx.max(0) + 0.5])
    ext = (corners[:, :3] * (lo_hi[1] - lo_hi[0]) + lo_hi[0]) @ a[:3, :3].T + a[:3, 3]
    spacing = np.abs(np.diag(a)[:3])
    pts = tri.reshape(-1, 3)
    assert np.all(np.abs(pts.min(0) - ext.min(0)) < spacing), (pts.min(0), ext.min(0))
    assert np.all(np.abs(pts.max(0) - ext.max(0)) < spacing), (pts.max(0), ext.max(0))

    # outward: positive signed volume close to the voxel volume; stored normals agree with winding
    vol = signed_volume(tri)
    assert vol == pytest.approx(mask.sum() * np.prod(spacing), rel=0.05)
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert np.all(np.einsum("ij,ij->i", face_n, normals) > 0)

    mesh = o3d.io.read_triangle_mesh(str(path)).remove_duplicated_vertices()
    assert mesh.is_watertight()
    assert len(mesh.triangles) == len(tri)


def test_lps_flips_x_and_y_and_is_default(tmp_path):
    mask, a = sphere(), affine()
    ras_v, ras_f = mask_to_mesh(mask, a, coordinate_system="RAS")
    lps_v, lps_f = mask_to_mesh(mask, a)
    np.testing.assert_allclose(lps_v, ras_v * [-1, -1, 1])
    assert np.array_equal(lps_f, ras_f)  # a 180 degree rotation keeps the winding
    header, _, tri = read_binary_stl(save_stl(tmp_path / "s.stl", mask, a))
    assert b"SPACE=LPS" in header and signed_volume(tri) > 0
    with pytest.raises(ValueError, match="coordinate_system"):
        mask_to_mesh(mask, a, coordinate_system="XYZ")


def test_mesh_errors_and_no_overwrite(tmp_path):
    mask, a = sphere(), affine()
    with pytest.raises(ValueError, match="empty"):
        mask_to_mesh(np.zeros_like(mask), a)
    with pytest.raises(ValueError, match="affine"):
        mask_to_mesh(mask, np.zeros((4, 4)))
    v, f = mask_to_mesh(mask[None], a, smooth=0.0, step_size=2)  # channel-first input, coarse mesh
    path = write_stl(tmp_path / "m.stl", v, f)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_stl(path, v, f)
    with pytest.raises(ValueError, match="faces index"):
        write_stl(tmp_path / "bad.stl", v, f + len(v))
    write_stl(path, v[:3], np.array([[0, 1, 2]]), overwrite=True)
    assert len(read_binary_stl(path)[2]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.stl"]  # no temporary files left


def soft_cap():
    """A spherical cap of bone 4 voxels thick (radius 9-13, k > 6) as an ensemble's probability of bone, soft
    across both surfaces (a Gaussian edge of 0.5 voxels), and a patch of it (i > 2) the members dispute
    (p 0.5 from radius 11 out to 16). Returns (skull, implant, sure probability, disputed probability)."""
    g = np.indices((N, N, N), dtype=np.float64) - (N - 1) / 2
    r = np.sqrt((g**2).sum(0))
    shell = (r > 9) & (r < 13)
    implant = shell & (g[2] > 6) & (np.abs(g[0]) < 6)
    cap = (g[2] > 6) & (np.abs(g[0]) < 6)
    sure = np.where(cap, ndtr((13 - r) / 0.5) * ndtr((r - 9) / 0.5), 0.0).astype(np.float32)
    disputed = np.where(cap & (g[0] > 2) & (r >= 11) & (r < 16), 0.5, sure).astype(np.float32)
    return shell & ~implant, implant, sure, disputed


def test_wrong_thickness_marks_the_disputed_patch_not_the_soft_surfaces():
    """Looking down k at the cap: the soft surfaces alone give about 2 x 0.8 x 0.5 voxels of expected wrong
    thickness on every line of sight, the disputed patch several voxels, while the largest p (1 - p) is near 0.25
    on both (every line of sight crosses a surface), so it could not tell them apart."""
    _, implant, sure, disputed = soft_cap()
    seen = implant.any(axis=2)
    patch = (disputed != sure).any(axis=2)
    thickness = wrong_thickness(disputed, implant, axis=2, voxel_mm=2.0)
    assert np.all(wrong_thickness(sure, implant, axis=2)[seen] < 1.5)
    assert thickness[patch & seen].mean() > UNSURE_MM and thickness[~patch & seen].max() < 3.0
    max_variance = (disputed * (1 - disputed)).max(axis=2)
    assert np.median(max_variance[~patch & seen]) > 0.2


def test_preview_png(tmp_path):
    skull, implant, sure, disputed = soft_cap()
    plain = imread(save_preview(tmp_path / "p.png", skull, implant, spacing=(1.0, 1.0, 2.0), title="case"))
    assert plain.shape == (450, 1200, 4)  # figsize (12, 4.5) inches at 100 dpi
    colours = np.unique(plain[..., :3].reshape(-1, 3), axis=0)
    assert len(colours) > 20
    orange = (plain[..., 0] > 0.6) & (plain[..., 2] < 0.3)
    assert orange.sum() > 500  # the implant is visible in colour

    def yellow(png):  # plasma's top: red and green high, blue low
        return ((png[..., 0] > 0.85) & (png[..., 1] > 0.75) & (png[..., 2] < 0.4)).sum()

    coloured = imread(save_preview(tmp_path / "s.png", skull, implant, probability=sure, spacing=(1.0, 1.0, 2.0)))
    flagged = imread(save_preview(tmp_path / "d.png", skull, implant, probability=disputed, spacing=(1.0, 1.0, 2.0)))
    assert coloured.shape == plain.shape
    assert np.abs(coloured - plain).max(-1).astype(bool).mean() > 0.02
    assert yellow(flagged) > yellow(coloured) + 300  # the disputed patch turns yellow
    with pytest.raises(FileExistsError):
        save_preview(tmp_path / "p.png", skull, implant)
    with pytest.raises(ValueError, match="spacing"):
        save_preview(tmp_path / "q.png", skull, implant, spacing=(1.0, 0.0, 1.0))
