"""SAP voxelizer: shapes, parameter count, gradients, ground-truth indicator, loss, short real training."""

import numpy as np
import pytest
import torch
from skimage.measure import marching_cubes

from scripts.networks.dpsr import indicator_to_mask, voxel_to_unit
from scripts.networks.sap import SAPIndicator, SAPVoxelizer, UNet3D, gt_indicator, sap_loss

SIZE = 32




def ellipsoid_shell(axes, centre, thickness=3.0, size=SIZE) -> np.ndarray:
    """Bool (size^3) hollow ellipsoid, a skull-like shell ``thickness`` voxels thick."""
    g = np.indices((size,) * 3, dtype=np.float32)
    outer = sum(((g[i] - centre[i]) / axes[i]) ** 2 for i in range(3))
    inner = sum(((g[i] - centre[i]) / (axes[i] - thickness)) ** 2 for i in range(3))
    return (outer <= 1) & (inner > 1)


def surface_points(mask: np.ndarray, n: int, rng) -> torch.Tensor:
    """n marching-cubes vertices of the mask surface -> unit-cube points (n, 3)."""
    verts = marching_cubes(np.pad(mask, 1).astype(np.float32), 0.5)[0] - 1
    verts = verts[rng.choice(len(verts), n, replace=False)].astype(np.float32)
    return torch.from_numpy(voxel_to_unit(verts, mask.shape))


def test_forward_shapes_and_finite_gradients():
    torch.manual_seed(0)
    model = SAPVoxelizer("tiny")
    points = 0.2 + 0.6 * torch.rand(2, 300, 3)
    out = model(points)
    r = model.config["dpsr_res"]
    assert out["indicator"].shape == (2, r, r, r)
    assert out["points"].shape == out["normals"].shape == (2, 7 * 300, 3)
    # the 7 copies of a point stay next to it (offsets are scaled by 1e-3)
    assert (out["points"].view(2, 300, 7, 3) - points[:, :, None]).abs().max() < 0.05
    moved, normals = model.oriented_points(points, res=64)  # same network output, DPSR-free
    torch.testing.assert_close(moved, out["points"])
    torch.testing.assert_close(normals, out["normals"])
    assert model.oriented_points(torch.full((1, 5, 3), 0.999), res=16)[0].max() <= 15 / 16  # off the wrap
    sap_loss(out["indicator"], torch.full_like(out["indicator"], 0.5)).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_paper_preset_parameter_count():
    model = SAPVoxelizer("paper")
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 1_085_080  # reference (pcdiff-implant SAP config) has 1,085,272
    assert abs(n_params - 1.1e6) / 1.1e6 < 0.1
    assert model.dpsr.res == 512 and model.encoder.grid_res == 32


def test_unet_keeps_resolution_and_overrides():
    x = torch.randn(1, 16, 8, 8, 8)
    assert UNet3D(16, 4, features=8, levels=3)(x).shape == (1, 4, 8, 8, 8)
    model = SAPVoxelizer("tiny", num_offset=3, dpsr_res=16)
    assert model(torch.rand(1, 50, 3) * 0.9)["points"].shape == (1, 150, 3)
    with pytest.raises(ValueError, match="unknown SAPVoxelizer option"):
        SAPVoxelizer("tiny", grid_resolution=8)
    with pytest.raises(ValueError, match="unknown SAPVoxelizer preset"):
        SAPVoxelizer("huge")


def test_gt_indicator_values_and_resampling():
    mask = np.zeros((20, 16, 12), dtype=np.uint8)
    mask[4:10, 3:9, 2:6] = 1
    gt = gt_indicator(mask, 20)  # res == side: the padded mask itself
    assert gt.shape == (20, 20, 20) and gt.dtype == torch.float32
    expected = np.full((20, 20, 20), 0.5, dtype=np.float32)
    expected[:20, :16, :12] -= mask
    np.testing.assert_array_equal(gt.numpy(), expected)
    # channel-first MONAI-style input and a coarser grid (node n <-> voxel 2n, 2-voxel box average)
    coarse = gt_indicator(torch.from_numpy(mask)[None], 10)
    assert coarse.shape == (10, 10, 10)
    assert coarse[3, 3, 2] == -0.5 and coarse[0, 0, 0] == 0.5 and coarse[8, 9, 9] == 0.5
    assert ((coarse >= -0.5) & (coarse <= 0.5)).all()
    with pytest.raises(ValueError, match="mask must be"):
        gt_indicator(np.zeros((4, 4)), 8)


def test_sap_loss_is_mse_of_tanh():
    torch.manual_seed(0)
    pred, gt = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 8, 8)
    assert sap_loss(pred, gt) == pytest.approx(((pred.tanh() - gt.tanh()) ** 2).mean().item(), rel=1e-6)
    assert sap_loss(gt, gt) == 0
    with pytest.raises(ValueError, match="shapes differ"):
        sap_loss(pred, gt[:1])


def test_short_training_reduces_loss():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    masks = [ellipsoid_shell((11, 9, 10), (15.5, 16, 15)), ellipsoid_shell((9, 11, 8), (16, 15, 16.5))]
    points = torch.stack([surface_points(m, 512, rng) for m in masks])
    gt = torch.stack([gt_indicator(m, SIZE) for m in masks])
    model = SAPVoxelizer("tiny")
    assert model.config["dpsr_res"] == SIZE
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = sap_loss(model(points)["indicator"], gt)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = np.mean(losses[-3:])
    assert final < 0.5 * losses[0]
    assert final < 0.6 * losses[5]  # keeps improving after the first steps, not just a sign/scale fix
    with torch.no_grad():
        pred = indicator_to_mask(model(points)["indicator"][0], masks[0].shape).numpy()
    assert (pred & masks[0]).sum() > 0.3 * masks[0].sum()  # the shell starts to appear


def test_sap_indicator_is_the_voxelizer_indicator_channel_first():
    """SAPIndicator (the export / verify_net_in_out interface) loads SAPVoxelizer weights and returns its
    indicator: (B, 3, N) points -> (B, 1, r, r, r)."""
    vox = SAPVoxelizer("tiny").eval()
    wrapped = SAPIndicator("tiny").eval()
    wrapped.load_state_dict(vox.state_dict())
    points = torch.rand(2, 300, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = wrapped(points.transpose(1, 2))
        assert out.shape == (2, 1, 32, 32, 32)
        assert torch.equal(out[:, 0], vox(points)["indicator"])
