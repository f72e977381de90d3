"""DPSR: analytic sphere, sign convention, gradients, permutation/batch invariance, grid helpers."""

import math

import numpy as np
import pytest
import torch

from scripts.networks.dpsr import DPSR, indicator_to_mask, nearest_node_index, unit_to_voxel, voxel_to_unit

RES, RADIUS, CENTRE = 64, 0.3, 0.5


def fibonacci_sphere(n: int, radius: float = RADIUS, centre: float = CENTRE, dtype=torch.float32):
    """n near-uniform points (n, 3) on a sphere and their outward unit normals (n, 3)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    polar = torch.acos(1 - 2 * i / n)
    azimuth = math.pi * (1 + 5**0.5) * i
    normals = torch.stack(
        (torch.cos(azimuth) * torch.sin(polar), torch.sin(azimuth) * torch.sin(polar), torch.cos(polar)), dim=-1
    )
    return (centre + radius * normals).to(dtype), normals.to(dtype)


def node_distance_to_centre(res: int) -> torch.Tensor:
    """Distance (r, r, r) of each grid node (i, j, k) / r to the sphere centre, in unit coordinates."""
    g = torch.arange(res, dtype=torch.float64) / res - CENTRE
    return (g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2).sqrt()


@pytest.fixture(scope="module")
def sphere_indicator():
    points, normals = fibonacci_sphere(20000)
    return DPSR(RES)(points[None], normals[None])[0]


def test_sphere_zero_level_is_the_sphere(sphere_indicator):
    dist = node_distance_to_centre(RES)
    analytic = dist <= RADIUS
    pred = sphere_indicator <= 0
    wrong = pred != analytic
    # voxel-accurate: every disagreement lies within one voxel of the analytic surface
    assert wrong.sum() < 0.01 * analytic.sum()
    assert ((dist[wrong] - RADIUS).abs() * RES).max() < 1.0


def test_sphere_sign_and_scale(sphere_indicator):
    dist = node_distance_to_centre(RES)
    assert sphere_indicator[0, 0, 0] == pytest.approx(0.5, abs=1e-6)  # corner (outside) is +0.5
    assert (sphere_indicator[dist < RADIUS - 2 / RES] < 0).all()
    assert (sphere_indicator[dist > RADIUS + 2 / RES] > 0).all()
    assert sphere_indicator[RES // 2, RES // 2, RES // 2] < -0.25


def test_mean_at_points_is_zero():
    points, normals = fibonacci_sphere(4000)
    ind = DPSR(32, scale=False)(points[None], normals[None])[0]
    sampled = torch.nn.functional.grid_sample(  # independent trilinear sampler; nodes at i / r
        ind[None, None], (points.flip(-1) * 32 / 31 * 2 - 1)[None, :, None, None], align_corners=True
    )
    assert sampled.mean().abs() < 1e-4 * ind.abs().max()


def test_gradients_flow_to_points_and_normals():
    torch.manual_seed(0)
    points, normals = fibonacci_sphere(2000)
    points = (points + 0.003 * torch.randn_like(points)).requires_grad_()
    normals = normals.clone().requires_grad_()
    DPSR(32)(points[None], normals[None]).square().mean().backward()
    for g in (points.grad, normals.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_gradcheck_tiny_grid_double():
    torch.manual_seed(0)
    points = (0.2 + 0.6 * torch.rand(1, 12, 3, dtype=torch.float64)).requires_grad_()
    normals = torch.randn(1, 12, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(DPSR(8), (points, normals), eps=1e-6, atol=1e-5, fast_mode=True)


def test_point_order_and_batch_independence():
    torch.manual_seed(0)
    p1, n1 = fibonacci_sphere(3000)
    p2, n2 = fibonacci_sphere(2500, radius=0.2, centre=0.45)
    dpsr = DPSR(32)
    single1, single2 = dpsr(p1[None], n1[None]), dpsr(p2[None], n2[None])
    perm = torch.randperm(3000)
    torch.testing.assert_close(dpsr(p1[None, perm], n1[None, perm]), single1, atol=1e-5, rtol=0)
    batch = dpsr(torch.stack((p1[:2500], p2)), torch.stack((n1[:2500], n2)))
    torch.testing.assert_close(batch[1:], single2, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[:1], dpsr(p1[None, :2500], n1[None, :2500]), atol=1e-5, rtol=0)


def test_voxel_unit_roundtrip_and_mask_crop():
    shape = (40, 30, 20)
    vox = np.array([[0.0, 0.0, 0.0], [39.0, 29.0, 19.0], [10.5, 3.25, 7.0]], dtype=np.float32)
    unit = voxel_to_unit(vox, shape)
    np.testing.assert_allclose(unit, vox / 40)
    np.testing.assert_allclose(unit_to_voxel(unit, shape), vox, rtol=1e-6)
    assert torch.equal(voxel_to_unit(torch.from_numpy(vox), shape, side=64), torch.from_numpy(vox) / 64)
    # crop: node (i, j, k) is voxel (i, j, k) when r == side
    ind = torch.rand(40, 40, 40) - 0.5
    torch.testing.assert_close(indicator_to_mask(ind, shape), ind[:40, :30, :20] <= 0)
    # coarser grid: each voxel takes its nearest node
    coarse = torch.rand(20, 20, 20) - 0.5
    mask = indicator_to_mask(coarse, shape)
    assert mask.shape == shape and bool(mask[7, 5, 3]) == bool(coarse[4, 2, 2] <= 0)  # 3.5 rounds to 4
    assert torch.equal(nearest_node_index(5, 10, 5), torch.tensor([0, 0, 1, 2, 2]))  # round half to even


def test_bad_input_errors():
    with pytest.raises(ValueError, match="side=10"):
        voxel_to_unit(np.zeros((2, 3)), (20, 5, 5), side=10)
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        DPSR(8)(torch.rand(5, 3), torch.rand(5, 3))
    with pytest.raises(ValueError, match="cubic"):
        indicator_to_mask(torch.zeros(8, 8, 4), (8, 8, 4))
