"""Tests for scripts.data.points on small analytic masks (spheres, shells) and NRRD round trips."""

import numpy as np
import open3d as o3d
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from scipy.ndimage import distance_transform_edt, map_coordinates
from scipy.spatial import cKDTree
from skimage.measure import marching_cubes

from scripts.data.points import (
    JitterPointsd,
    MirrorPointsd,
    NormalizePointsd,
    SamplePointsd,
    SurfacePointsd,
    denormalize_points,
    mask_to_surface_points,
    mirror_over_openings,
    normalization_params,
    normalize_points,
    physical_to_voxel,
    voxel_to_physical,
)
from scripts.io import save_mask

SHAPE, CENTRE, R_OUT, R_IN = (40, 40, 40), 19.5, 12.0, 8.0
# anisotropic grid with a flipped axis and an offset origin
AFFINE = np.array([[-0.5, 0, 0, 30.0], [0, 0.8, 0, -12.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])


def radius(shape, centre=CENTRE, affine=None):
    """Distance of every voxel centre from ``centre`` (voxel units, or mm with ``affine``)."""
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1).T
    pts = idx - centre if affine is None else voxel_to_physical(idx, affine) - centre
    return np.linalg.norm(pts, axis=1).reshape(shape)


def shell(shape=SHAPE, r_out=R_OUT, r_in=R_IN):
    r = radius(shape)
    return ((r < r_out) & (r > r_in)).astype(np.uint8)


def shell_distance(points, centre=CENTRE, r_out=R_OUT, r_in=R_IN):
    r = np.linalg.norm(np.asarray(points, dtype=np.float64) - centre, axis=-1)
    return np.minimum(abs(r - r_out), abs(r - r_in))


def defect_pair(shape=(32, 32, 32), cap=4.0):
    """Defective shell (a cap cut off along +x) and its implant (the cap)."""
    c = (np.array(shape) - 1) / 2
    full = shell(shape, r_out=11.0, r_in=7.0).astype(bool)
    cut = np.indices(shape)[0] > c[0] + cap
    return (full & ~cut).astype(np.uint8), (full & cut).astype(np.uint8)


@pytest.fixture(scope="module")
def mask():
    return shell()


@pytest.fixture(scope="module")
def points(mask):
    return mask_to_surface_points(mask, 2000, seed=0)


def nearest(points, pool):
    """Distance and index of the nearest ``pool`` point for every point."""
    return cKDTree(np.asarray(pool)).query(np.asarray(points))


def boundary_distance(mask, points):
    """|signed EDT| of the mask boundary (0 half-way between inside and outside voxels) at points."""
    mask = np.asarray(mask, dtype=bool)
    sdf = distance_transform_edt(mask) - distance_transform_edt(~mask)
    sdf = sdf - 0.5 * np.sign(sdf)
    return np.abs(map_coordinates(sdf, np.asarray(points).T, order=1))


def test_points_on_analytic_surface_and_mask_boundary(mask, points):
    assert points.shape == (2000, 3) and points.dtype == np.float32
    assert shell_distance(points).max() < 1.0
    assert boundary_distance(mask, points).max() < 1.0


def test_poisson_disk_spread_better_than_uniform(mask, points):
    verts, faces, _, _ = marching_cubes(np.pad(mask, 1).astype(np.float32), 0.5)
    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(verts - 1.0), o3d.utility.Vector3iVector(faces))
    o3d.utility.random.seed(0)
    uniform = np.asarray(mesh.sample_points_uniformly(len(points)).points)
    min_dist = lambda p: cKDTree(p).query(p, k=2)[0][:, 1].min()  # noqa: E731
    assert min_dist(points) > 0.5
    assert min_dist(points) > 5 * min_dist(uniform)


def test_surface_points_deterministic(mask, points):
    np.testing.assert_array_equal(mask_to_surface_points(mask, 2000, seed=0), points)
    assert not np.array_equal(mask_to_surface_points(mask, 2000, seed=1), points)
    assert mask_to_surface_points(mask, 333, seed=0, init_factor=2).shape == (333, 3)


def test_physical_coordinates_anisotropic():
    centre_mm = voxel_to_physical(np.array([[20.0, 15.0, 6.0]]), AFFINE)[0]
    ball = (radius((40, 30, 12), centre_mm, AFFINE) < 7.0).astype(np.uint8)
    phys = mask_to_surface_points(ball, 800, seed=3, affine=AFFINE, coords="physical")
    vox = mask_to_surface_points(ball, 800, seed=3)
    np.testing.assert_allclose(phys, voxel_to_physical(vox, AFFINE), atol=1e-4)
    # on the 7 mm sphere up to one (largest) voxel spacing
    assert np.abs(np.linalg.norm(phys - centre_mm, axis=1) - 7.0).max() < 2.0


def test_affine_helpers_inverse_and_types():
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 40, (2, 50, 3)).astype(np.float32)
    phys = voxel_to_physical(pts, AFFINE)
    assert phys.shape == pts.shape and phys.dtype == np.float32
    np.testing.assert_allclose(phys[0, 0], AFFINE[:3, :3] @ pts[0, 0] + AFFINE[:3, 3], rtol=1e-6)
    np.testing.assert_allclose(physical_to_voxel(phys, AFFINE), pts, atol=1e-5)
    t = voxel_to_physical(torch.from_numpy(pts), torch.from_numpy(AFFINE))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_array_equal(t.numpy(), phys)
    with pytest.raises(ValueError, match="4x4"):
        voxel_to_physical(pts, np.eye(3))


def test_bad_inputs_raise_clear_errors(mask):
    with pytest.raises(ValueError, match="empty"):
        mask_to_surface_points(np.zeros((8, 8, 8)), 10)
    with pytest.raises(ValueError, match="affine"):
        mask_to_surface_points(mask, 10, coords="physical")
    with pytest.raises(ValueError, match="3-D"):
        mask_to_surface_points(mask[0], 10)
    with pytest.raises(ValueError, match="'implant'"):
        SurfacePointsd(["defective", "implant"], num_points={"defective": 10})
    with pytest.raises(ValueError, match="'defective'.*one channel"):
        SurfacePointsd("defective", 10)({"defective": np.stack([mask, mask])})
    with pytest.raises(ValueError, match="'defective'.*empty"):
        SurfacePointsd("defective", 10)({"defective": np.zeros((1, 8, 8, 8))})


def test_normalize_round_trip_and_bbox():
    rng = np.random.default_rng(1)
    d = {
        "condition": torch.from_numpy(rng.uniform([3, 5, 7], [30, 20, 25], (500, 3)).astype(np.float32)),
        "target": torch.from_numpy(rng.uniform(0, 35, (64, 3)).astype(np.float32)),
    }
    norm = NormalizePointsd(keys=("condition", "target"))
    out = norm(d)
    lo, hi = out["condition"].amin(0), out["condition"].amax(0)
    torch.testing.assert_close((lo + hi) / 2, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close((hi - lo).max(), torch.tensor(6.0), atol=1e-5, rtol=0)
    assert out["norm_center"].shape == (3,) and out["norm_scale"].shape == ()
    # the target uses the condition's centre/scale, not its own
    c, s = out["norm_center"], out["norm_scale"]
    torch.testing.assert_close(out["target"], (d["target"] - c) / s)
    back = norm.inverse(out)
    assert set(back) == set(d)
    for k in d:
        torch.testing.assert_close(back[k], d[k], atol=1e-5, rtol=1e-6)
    # the functional API on numpy, and on a (B, N, 3) batch
    p = d["condition"].numpy()
    c, s = normalization_params(p)
    np.testing.assert_allclose(denormalize_points(normalize_points(p, c, s), c, s), p, atol=1e-5)
    batch = torch.stack([d["condition"], 2 * d["condition"] + 1])
    c, s = normalization_params(batch)
    assert c.shape == (2, 3) and s.shape == (2,)
    torch.testing.assert_close(denormalize_points(normalize_points(batch, c, s), c, s), batch)
    with pytest.raises(ValueError, match="zero extent"):
        normalization_params(torch.ones(5, 3))


def test_sample_points_sizes_and_replacement():
    src = {"defective_points": torch.randn(100, 3), "implant_points": torch.randn(10, 3)}
    sampler = SamplePointsd(num_condition=60, num_target=25)
    sampler.set_random_state(0)
    out = sampler(src)
    assert out["condition"].shape == (60, 3) and out["target"].shape == (25, 3)
    # enough points: without replacement; too few: with replacement, drawn from the source
    assert len(torch.unique(out["condition"], dim=0)) == 60
    assert len(torch.unique(out["target"], dim=0)) <= 10
    assert nearest(out["target"], src["implant_points"])[0].max() == 0
    again = SamplePointsd(num_condition=60, num_target=25).set_random_state(0)(src)
    torch.testing.assert_close(again["condition"], out["condition"])
    assert not torch.equal(sampler(src)["condition"], out["condition"])
    # inference: only the condition source is present
    inf = SamplePointsd(num_condition=60, allow_missing_keys=True)({"defective_points": src["defective_points"]})
    assert inf["condition"].shape == (60, 3) and "target" not in inf


def test_mirror_over_openings_fills_a_one_sided_defect():
    """A shell with a cap cut off on the +x side, centred in its cube: its mirror image across the cube's
    middle plane over the opening is the cap's surface (the implant), nothing of the intact bone; at least
    ``min_points`` come back (the next farthest pad them); torch in, torch out."""
    full = shell(r_in=R_OUT - 2.5).astype(bool)  # centred in its 40^3 cube, thin as bone is at this spacing
    side = SHAPE[0]
    cut = np.indices(SHAPE)[0] > (side - 1) / 2 + 4.0
    defective, implant = (full & ~cut).astype(np.uint8), (full & cut).astype(np.uint8)
    points = torch.from_numpy(mask_to_surface_points(defective, 4000, seed=0))
    over = mirror_over_openings(points, side)
    assert isinstance(over, torch.Tensor) and over.dtype == torch.float32
    cap = mask_to_surface_points(implant, 1000, seed=0)
    assert 0.5 * len(cap) / 5 < len(over)  # the cap is about a fifth of the shell's surface
    # on the cap's surface (voxels), on the open side; a few come from the cut's rim face, mirrored into the bone
    assert np.mean(nearest(over, cap)[0] < 1.5) > 0.98
    assert np.mean(over[:, 0].numpy() > (side - 1) / 2 + 4.0 - 1.5) > 0.98
    assert len(mirror_over_openings(points, side, min_points=len(over) + 50)) == len(over) + 50
    whole = torch.from_numpy(mask_to_surface_points(full, 4000, seed=0))
    assert len(mirror_over_openings(whole, side)) < 0.01 * len(whole)  # a symmetric skull: no opening
    d = MirrorPointsd(min_points=10)({"defective_points": points, "cube_side": side})
    torch.testing.assert_close(d["mirror_points"], over)
    with pytest.raises(KeyError, match="cube_side"):
        MirrorPointsd()({"defective_points": points})


def test_sample_points_with_mirror_points():
    """num_mirror: the condition is num_condition - num_mirror skull points, then num_mirror mirror points."""
    src = {"defective_points": torch.randn(100, 3), "implant_points": torch.randn(10, 3),
           "mirror_points": torch.randn(30, 3) + 10.0}
    out = SamplePointsd(num_condition=60, num_target=25, num_mirror=16).set_random_state(0)(src)
    assert out["condition"].shape == (60, 3) and out["target"].shape == (25, 3)
    assert nearest(out["condition"][:44], src["defective_points"])[0].max() == 0
    assert nearest(out["condition"][44:], src["mirror_points"])[0].max() == 0
    with pytest.raises(KeyError, match="mirror"):
        SamplePointsd(num_condition=60, num_target=25, num_mirror=16)({k: src[k] for k in ("defective_points", "implant_points")})
    with pytest.raises(ValueError, match="num_mirror"):
        SamplePointsd(num_condition=60, num_mirror=60)


def test_jitter_points():
    pts = torch.from_numpy(np.random.default_rng(2).uniform(-3, 3, (4000, 3)).astype(np.float32))
    dropped = JitterPointsd("p", drop_fraction=0.25).set_random_state(0)({"p": pts})["p"]
    assert dropped.shape == (3000, 3)
    # kept points are an ordered subsequence of the input
    dist, idx = nearest(dropped, pts)
    assert dist.max() == 0 and (np.diff(idx) > 0).all()
    jitter = JitterPointsd("p", sigma=0.05).set_random_state(0)
    noisy = jitter({"p": pts})["p"]
    assert noisy.dtype == torch.float32 and noisy.shape == pts.shape
    assert abs(float((noisy - pts).std()) - 0.05) < 0.005
    torch.testing.assert_close(JitterPointsd("p", sigma=0.05).set_random_state(0)({"p": pts})["p"], noisy)


def test_compose_chain_on_nrrd_and_collate(tmp_path):
    affine = np.diag([0.5, 0.5, 0.8, 1.0])
    files = []
    for i, cap in enumerate((2.0, 4.0, 6.0)):
        defective, implant = defect_pair(cap=cap)
        files.append(
            {
                "defective": str(save_mask(tmp_path / f"def_{i}.nrrd", defective, affine)),
                "implant": str(save_mask(tmp_path / f"imp_{i}.nrrd", implant, affine)),
            }
        )
    keys = ["defective", "implant"]
    chain = Compose(
        [
            LoadImaged(keys, image_only=True),
            EnsureChannelFirstd(keys),
            SurfacePointsd(keys, num_points={"defective": 600, "implant": 200}, coords="physical"),
            SamplePointsd(num_condition=256, num_target=64),
            NormalizePointsd(keys=("condition", "target")),
        ]
    ).set_random_state(0)

    one = chain(files[0])
    np.testing.assert_allclose(one["defective"].affine.numpy(), affine)
    # physical surface points are the voxel ones mapped by the loaded affine
    vox = mask_to_surface_points(one["defective"][0], 600, seed=0)
    torch.testing.assert_close(one["defective_points"], torch.from_numpy(voxel_to_physical(vox, affine)))
    # Compose.inverse undoes the normalisation
    inv = chain.inverse(one)
    assert "norm_center" not in inv
    assert nearest(inv["condition"], one["defective_points"])[0].max() < 1e-4
    # a seeded Compose is reproducible
    torch.testing.assert_close(chain.set_random_state(0)(files[0])["condition"], one["condition"])

    loader = DataLoader(Dataset(files, chain), batch_size=2, num_workers=0)
    batch = next(iter(loader))
    assert batch["condition"].shape == (2, 256, 3) and batch["target"].shape == (2, 64, 3)
    assert batch["norm_center"].shape == (2, 3) and batch["norm_scale"].shape == (2,)
    assert float(batch["condition"].abs().max()) <= 3.0 + 1e-5
    # denormalised batches land back on the implant surfaces
    target = denormalize_points(batch["target"], batch["norm_center"], batch["norm_scale"])
    for b in range(2):
        vox = physical_to_voxel(target[b], affine).numpy()
        assert boundary_distance(batch["implant"][b, 0].numpy(), vox).max() < 1.0
