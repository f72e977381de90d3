"""PVCNN2 denoiser: shapes, paper parameter count, gradients, determinism, a real training signal,
and the exactness of the distinct-slot SA computation."""

import pytest
import torch
import torch.nn as nn

from scripts.networks.pvcnn2 import (
    PRESETS,
    PVCNN2Denoiser,
    SetAbstraction,
    build_denoiser,
    unique_slots,
    weighted_group_norm,
)
from scripts.networks.pvcnn_ops import ball_query, group




def shell_batch(b, n, seed):
    """Points on a radius-3 sphere (the normalised skull scale), channels-first (B, 3, N)."""
    x = torch.randn(b, n, 3, generator=torch.Generator().manual_seed(seed))
    return (x / x.norm(dim=2, keepdim=True) * 3).transpose(1, 2).contiguous()


def test_paper_preset_parameter_count():
    model = PVCNN2Denoiser("paper")  # construction only, no forward
    n = sum(p.numel() for p in model.parameters())
    assert n == 27_648_963  # paper: "27.65 M"
    assert abs(n - 27_650_000) / 27_650_000 < 0.01
    cfg = model.config
    assert (cfg["num_points"], cfg["num_condition"]) == (30720, 27648)
    assert cfg["centers"] == (10240, 2560, 640, 160) and cfg["radii"] == (0.1, 0.2, 0.4, 0.8)
    assert cfg["neighbors"] == (128,) * 4 and cfg["embed_dim"] == 64 and cfg["dropout"] == 0.1


def test_small_preset_size():
    n = sum(p.numel() for p in build_denoiser("small").parameters())
    assert 0.5e6 < n < 2e6
    assert PRESETS["small"]["num_points"] <= 4096


def test_tiny_forward_backward_finite_gradients():
    torch.manual_seed(0)
    model = PVCNN2Denoiser("tiny")
    n = model.config["num_points"]
    x, t = shell_batch(2, n, 0), torch.tensor([3, 900])
    out = model(x, t)
    assert out.shape == (2, 3, n) and out.dtype == torch.float32
    out[:, :, model.config["num_condition"]:].square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0


def test_mirror_points_enter_through_a_flag_channel():
    """With num_mirror the level-0 features gain a flag on the condition's last num_mirror points: the network
    trains (finite gradients) and its output depends on which points carry the flag."""
    torch.manual_seed(0)
    model = PVCNN2Denoiser("tiny", num_mirror=64).eval()
    plain = PVCNN2Denoiser("tiny")
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in plain.parameters())
    n, nc = model.config["num_points"], model.config["num_condition"]
    x, t = shell_batch(2, n, 0), torch.tensor([3, 900])
    out = model(x, t)
    assert out.shape == (2, 3, n)
    model.config["num_mirror"] = 32  # the flag on fewer points: another input
    assert not torch.allclose(model(x, t)[:, :, nc:], out[:, :, nc:])
    model.config["num_mirror"] = 64
    model.train()
    model(x, t)[:, :, nc:].square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match="num_mirror"):
        PVCNN2Denoiser("tiny", num_mirror=model.config["num_condition"])


def test_eval_is_deterministic_and_time_dependent():
    torch.manual_seed(1)
    model = PVCNN2Denoiser("tiny").eval()
    x = shell_batch(2, 512, 1)
    with torch.no_grad():
        a = model(x, torch.tensor([10, 10]))
        b = model(x, torch.tensor([10, 10]))
        c = model(x, torch.tensor([500, 500]))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_training_steps_reduce_mse():
    """Diffusion-style signal on a fixed batch: noise the generated points (condition first,
    clean), predict the noise; a few Adam steps must push the MSE well below its start (~1)."""
    torch.manual_seed(2)
    model = PVCNN2Denoiser("tiny")
    nc = model.config["num_condition"]
    x0, t = shell_batch(2, 512, 2), torch.tensor([600, 900])
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)[t].view(2, 1, 1)
    eps = torch.randn(2, 3, 512 - nc, generator=torch.Generator().manual_seed(3))
    x = torch.cat([x0[:, :, :nc], alpha_bar.sqrt() * x0[:, :, nc:] + (1 - alpha_bar).sqrt() * eps], dim=2)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = (model(x, t)[:, :, nc:] - eps).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.8
    assert min(losses[-3:]) < 0.6


def test_coordinate_skip_starts_as_the_plain_network_and_can_copy_its_input():
    torch.manual_seed(3)
    plain = PVCNN2Denoiser("tiny", dropout=0.0, head_dropout=0.0).eval()
    skip = PVCNN2Denoiser("tiny", dropout=0.0, head_dropout=0.0, coordinate_skip=True).eval()
    x, t = shell_batch(2, 512, 3), torch.tensor([5, 900])
    with torch.no_grad():
        missing = skip.load_state_dict(plain.state_dict(), strict=False).missing_keys
        assert sorted(missing) == ["skip_gate.bias", "skip_gate.weight"]  # the gate starts closed
        torch.testing.assert_close(skip(x, t), plain(x, t))
        skip.skip_gate.bias.fill_(0.1)  # gate = gain (10) x 0.1 = 1: the output is the input
        torch.testing.assert_close(skip(x, t), x)


def test_coordinate_skip_gate_opens_where_the_input_is_the_better_estimate():
    """x0 regression at low noise: Adam steps open the gate at small t, and the loss falls."""
    torch.manual_seed(4)
    model = PVCNN2Denoiser("tiny", dropout=0.0, head_dropout=0.0, coordinate_skip=True)
    nc = model.config["num_condition"]
    x0, t = shell_batch(4, 512, 4), torch.tensor([2, 5, 8, 10])
    noise = 0.01 * torch.randn(4, 3, 512 - nc, generator=torch.Generator().manual_seed(5))
    x = torch.cat([x0[:, :, :nc], x0[:, :, nc:] + noise], dim=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = (model(x, t)[:, :, nc:] - x0[:, :, nc:]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    gate = model.skip_gate(model.time_embed(t)).detach()
    assert (gate > 0.01).all()
    assert losses[-1] < 0.5 * losses[0]


def test_distinct_slot_sa_equals_full_k_reference():
    """The SA MLP on distinct slots with repeat-count weights == reference MLP on all K slots."""
    torch.manual_seed(4)
    sa = SetAbstraction([], num_centers=40, radius=0.8, num_neighbors=32, in_channels=8, mlp_channels=(16, 32)).double()
    coords = shell_batch(2, 300, 4).double()
    feats = torch.randn(2, 8, 300, dtype=torch.float64)
    out, centers = sa(feats, coords)
    nbr = ball_query(centers.transpose(1, 2), coords.transpose(1, 2), sa.radius, sa.num_neighbors)
    assert unique_slots(nbr)[0].shape[2] < nbr.shape[2]  # the shortcut does skip work here
    grouped = torch.cat([group(coords, nbr) - centers.unsqueeze(3), group(feats, nbr)], dim=1)
    torch.testing.assert_close(out, sa.mlp(grouped).amax(dim=3), rtol=1e-10, atol=1e-10)


def test_weighted_group_norm():
    torch.manual_seed(5)
    norm = nn.GroupNorm(2, 4)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(3, 4, 5, 2, dtype=torch.float64) * 3 + 1
    norm = norm.double()
    torch.testing.assert_close(weighted_group_norm(x, torch.ones(3, 5, 2), norm), norm(x))
    w = torch.tensor([3, 1, 0, 2, 1]).view(1, 5, 1).expand(3, 5, 2)  # integer weights == repeated positions
    rep = torch.repeat_interleave(x, w[0, :, 0], dim=2)
    torch.testing.assert_close(weighted_group_norm(x, w, norm)[:, :, [0, 1, 3, 4]], norm(rep)[:, :, [0, 3, 4, 6]])


def test_presets_and_overrides_validated():
    with pytest.raises(ValueError, match="unknown preset"):
        PVCNN2Denoiser("huge")
    with pytest.raises(ValueError, match="radius_scale"):
        PVCNN2Denoiser("tiny", radius_scale=2)
    with pytest.raises(ValueError, match="width_multiplier"):
        PVCNN2Denoiser("tiny", width_multiplier=0.1)
    with pytest.raises(ValueError, match="centers"):
        PVCNN2Denoiser("tiny", centers=(10, 5))
    model = PVCNN2Denoiser("tiny", use_attention=False, embed_dim=8)
    assert model.global_att is None and model.config["embed_dim"] == 8
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 512, 3), torch.zeros(1, dtype=torch.long))
