"""Forward process, training loss and Chamfer distance of scripts.diffusion."""

import numpy as np
import pytest
import torch

from scripts.diffusion.chamfer import chamfer_distance
from scripts.diffusion.process import ConditionalDiffusion


class PointMLP(torch.nn.Module):
    """Per-point MLP on (x, y, z, t / T): a real, differentiable eps-model (B, 3, N) -> (B, 3, N)."""

    def __init__(self, num_timesteps: int = 1000):
        super().__init__()
        self.num_timesteps = num_timesteps
        self.net = torch.nn.Sequential(torch.nn.Conv1d(4, 32, 1), torch.nn.SiLU(), torch.nn.Conv1d(32, 3, 1))

    def forward(self, x, t):
        tt = (t.float() / self.num_timesteps)[:, None, None].expand(-1, 1, x.shape[2])
        return self.net(torch.cat([x, tt], dim=1))


@pytest.mark.parametrize("steps,b0,b1", [(1000, 1e-4, 0.02), (100, 1e-3, 0.05)])
def test_linear_schedule_matches_closed_form(steps, b0, b1):
    diff = ConditionalDiffusion(num_train_timesteps=steps, beta_start=b0, beta_end=b1)
    closed = np.cumprod(1.0 - np.linspace(b0, b1, steps))
    abar = diff.alphas_cumprod.double().numpy()
    assert diff.num_timesteps == steps and abar.shape == (steps,)
    np.testing.assert_allclose(abar[0], 1.0 - b0, rtol=1e-6)
    np.testing.assert_allclose(abar[-1], closed[-1], rtol=1e-5)
    np.testing.assert_allclose(abar, closed, rtol=1e-5)
    assert np.all(np.diff(abar) < 0)


def test_q_sample_keeps_condition_and_has_gaussian_marginal():
    diff = ConditionalDiffusion()
    g = torch.Generator().manual_seed(0)
    b, nc, nt = 4000, 5, 7
    x0 = torch.randn(1, 3, nc + nt, generator=g).expand(b, -1, -1).contiguous()
    t = torch.tensor([100, 700]).repeat(b // 2)  # two timesteps interleaved in one batch
    noise = torch.randn(b, 3, nt, generator=g)
    xt = diff.q_sample(x0, t, noise, num_condition=nc)
    assert xt.shape == x0.shape
    assert torch.equal(xt[:, :, :nc], x0[:, :, :nc])
    for k, tk in enumerate((100, 700)):
        abar = diff.alphas_cumprod[tk].double()
        part = xt[k::2, :, nc:].double()
        mean, var = part.mean(0), part.var(0)
        # 2000 draws per entry: std error of the mean = sqrt(var / 2000) <= 0.023, of the variance ~ 3 %
        torch.testing.assert_close(mean, abar.sqrt() * x0[0, :, nc:].double(), atol=0.1, rtol=0)
        torch.testing.assert_close(var, (1 - abar).expand_as(var), atol=0.0, rtol=0.15)


def test_q_sample_rejects_full_size_noise():
    diff = ConditionalDiffusion()
    x0 = torch.zeros(2, 3, 10)
    with pytest.raises(ValueError, match="target shape"):
        diff.q_sample(x0, torch.zeros(2, dtype=torch.long), torch.zeros(2, 3, 10), num_condition=4)


class ConditionSpy(torch.nn.Module):
    """Wraps a model: records its input and adds `offset` to the eps predicted for the condition points."""

    def __init__(self, model, num_condition, offset):
        super().__init__()
        self.model, self.nc, self.offset = model, num_condition, offset
        self.inputs = []

    def forward(self, x, t):
        self.inputs.append(x.detach().clone())
        eps = self.model(x, t)
        return torch.cat([eps[:, :, : self.nc] + self.offset, eps[:, :, self.nc :]], dim=2)


def test_training_loss_scores_generated_points_only():
    torch.manual_seed(0)
    diff, net, nc = ConditionalDiffusion(), PointMLP(), 6
    x0 = torch.randn(3, 3, nc + 10)
    losses = []
    for offset in (0.0, 100.0):
        spy = ConditionSpy(net, nc, offset)
        losses.append(diff.training_loss(spy, x0, nc, generator=torch.Generator().manual_seed(1)))
        assert torch.equal(spy.inputs[0][:, :, :nc], x0[:, :, :nc])  # condition fed un-noised
    assert losses[0].ndim == 0 and torch.isfinite(losses[0])
    assert torch.equal(losses[0], losses[1])

    # Same draws by hand: t first, then the target noise, from the same generator.
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, diff.num_timesteps, (3,), generator=g)
    noise = torch.randn(3, 3, 10, generator=g)
    eps = net(diff.q_sample(x0, t, noise, nc), t)[:, :, nc:]
    torch.testing.assert_close(losses[0], ((eps - noise) ** 2).mean())

    losses[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_training_loss_targets_of_other_prediction_types(prediction_type):
    """x0 prediction regresses the clean generated points; v prediction regresses sqrt(abar) eps - sqrt(1 - abar) x0."""
    torch.manual_seed(0)
    diff, net, nc = ConditionalDiffusion(prediction_type=prediction_type), PointMLP(), 6
    x0 = torch.randn(3, 3, nc + 10)
    loss = diff.training_loss(net, x0, nc, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, diff.num_timesteps, (3,), generator=g)
    noise = torch.randn(3, 3, 10, generator=g)
    out = net(diff.q_sample(x0, t, noise, nc), t)[:, :, nc:]
    abar = diff.alphas_cumprod[t][:, None, None]
    target = x0[:, :, nc:]
    goal = target if prediction_type == "sample" else abar.sqrt() * noise - (1 - abar).sqrt() * target
    torch.testing.assert_close(loss, ((out - goal) ** 2).mean())


def test_prediction_type_is_checked():
    with pytest.raises(ValueError, match="prediction_type"):
        ConditionalDiffusion(prediction_type="x0")


def test_training_loss_draws_depend_on_generator():
    diff, net = ConditionalDiffusion(), PointMLP()
    x0 = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(0))
    a, b, c = (diff.training_loss(net, x0, 4, generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("num_condition", [-1, 12])
def test_training_loss_rejects_bad_num_condition(num_condition):
    with pytest.raises(ValueError, match="num_condition"):
        ConditionalDiffusion().training_loss(PointMLP(), torch.zeros(1, 3, 12), num_condition)


def test_chamfer_distance_values():
    a = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]])
    b = torch.tensor([[[0.0, 1.0, 0.0]]])
    # a -> b: distances 1 and sqrt(5); b -> a: 1
    torch.testing.assert_close(chamfer_distance(a, b), torch.tensor([(1.0 + 5.0) / 2 + 1.0]))
    torch.testing.assert_close(chamfer_distance(a, b, squared=False), torch.tensor([(1.0 + 5**0.5) / 2 + 1.0]))
    torch.testing.assert_close(chamfer_distance(b, a), chamfer_distance(a, b))


def test_chamfer_distance_chunked_equals_dense():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 500, 3, generator=g), torch.randn(3, 300, 3, generator=g)
    d = torch.cdist(a, b) ** 2
    dense = d.min(2).values.mean(1) + d.min(1).values.mean(1)
    torch.testing.assert_close(chamfer_distance(a, b, max_elements=3 * 300 * 7), dense)  # chunks of 7 rows
    torch.testing.assert_close(chamfer_distance(a, b), dense)
    torch.testing.assert_close(chamfer_distance(a, a), torch.zeros(3), atol=1e-6, rtol=0)  # cdist's matmul path


def test_chamfer_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shapes"):
        chamfer_distance(torch.zeros(2, 5, 3), torch.zeros(3, 5, 3))
    with pytest.raises(ValueError, match="empty"):
        chamfer_distance(torch.zeros(1, 0, 3), torch.zeros(1, 5, 3))
