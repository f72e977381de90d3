"""Samplers of scripts.diffusion: DDPM, DDIM, DPM-Solver++ 2M on real (tiny) networks."""

import math

import pytest
import torch

from scripts.diffusion.chamfer import chamfer_distance
from scripts.diffusion.process import ConditionalDiffusion
from scripts.diffusion.samplers import dpmpp_timesteps, strided_timesteps




class PointNetEps(torch.nn.Module):
    """Per-point MLP + sinusoidal time embedding + max-pooled condition feature: (B, 3, N), (B,) -> (B, 3, N)."""

    def __init__(self, num_condition: int, width: int = 64, temb: int = 16):
        super().__init__()
        self.nc, self.temb = num_condition, temb
        self.local = torch.nn.Sequential(
            torch.nn.Linear(4 + temb, width), torch.nn.SiLU(), torch.nn.Linear(width, width)
        )
        self.head = torch.nn.Sequential(
            torch.nn.Linear(2 * width + temb, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, 3),
        )

    def forward(self, x, t):
        b, _, n = x.shape
        freqs = torch.exp(-math.log(1000.0) * torch.arange(self.temb // 2) / (self.temb // 2))
        angles = t.float()[:, None] * freqs[None]
        emb = torch.cat([angles.sin(), angles.cos()], dim=1)[:, None].expand(b, n, -1)
        is_target = (torch.arange(n) >= self.nc).float()[None, :, None].expand(b, n, 1)
        h = self.local(torch.cat([x.transpose(1, 2), is_target, emb], dim=2))
        context = h[:, : self.nc].max(dim=1, keepdim=True).values.expand(b, n, -1)
        return self.head(torch.cat([h, context, emb], dim=2)).transpose(1, 2)


class GaussianOracle:
    """Exact eps for data x0 ~ N(mu, s^2 I) per point, with mu = mean of the condition points."""

    def __init__(self, alphas_cumprod, num_condition, s):
        self.abar, self.nc, self.s = alphas_cumprod.double(), num_condition, s

    def __call__(self, x, t):
        mu = x[:, :, : self.nc].mean(dim=2, keepdim=True)
        a, sig = self.abar[t].sqrt()[:, None, None], (1 - self.abar[t]).sqrt()[:, None, None]
        return sig * (x - a * mu) / (a**2 * self.s**2 + sig**2)


NC, NT = 16, 24
CASES = [
    ("ddpm", {}),
    ("ddim", {"steps": 10}),
    ("ddim", {"steps": 7, "spacing": "leading", "eta": 1.0}),
    ("dpmpp_2m", {"steps": 10}),
    ("dpmpp_2m", {"steps": 8, "spacing": "logsnr"}),
]


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    net = PointNetEps(NC).eval()
    condition = torch.randn(3, 3, NC, generator=torch.Generator().manual_seed(1))
    return ConditionalDiffusion(num_train_timesteps=100), net, condition


@pytest.mark.parametrize("sampler,kwargs", CASES)
def test_sampler_keeps_condition_and_is_seeded(untrained, sampler, kwargs):
    diff, net, condition = untrained
    run = lambda seed: diff.sample(  # noqa: E731
        net, condition, NT, sampler=sampler, generator=torch.Generator().manual_seed(seed), **kwargs
    )
    out = run(0)
    assert out.shape == (3, 3, NC + NT)
    assert torch.equal(out[:, :, :NC], condition)
    assert torch.isfinite(out).all()
    assert torch.equal(out, run(0))
    assert not torch.allclose(out[:, :, NC:], run(1)[:, :, NC:])


def test_model_always_sees_the_condition(untrained):
    diff, net, condition = untrained
    seen = []

    def spy(x, t):
        seen.append(torch.equal(x[:, :, :NC], condition) and t.shape == (3,) and t.dtype == torch.long)
        return net(x, t)

    diff.sample(spy, condition, NT, sampler="dpmpp_2m", steps=5, generator=torch.Generator().manual_seed(0))
    assert seen == [True] * 5


@pytest.mark.parametrize(
    "sampler,steps,calls",
    [("ddpm", None, 1000), ("ddim", 50, 50), ("ddim", None, 50), ("dpmpp_2m", 10, 10), ("dpmpp_2m", None, 20)],
)
def test_network_call_counts(sampler, steps, calls):
    diff, counter = ConditionalDiffusion(), []

    def model(x, t):
        counter.append(int(t[0]))
        return torch.zeros_like(x)

    diff.sample(model, torch.zeros(1, 3, 4), 4, sampler=sampler, steps=steps)
    assert diff.last_model_calls == len(counter) == calls
    assert counter == sorted(counter, reverse=True) and len(set(counter)) == calls


def test_timestep_spacings():
    assert strided_timesteps(1000, 20, "trailing")[:2] == [999, 949] and strided_timesteps(1000, 20)[-1] == 49
    assert strided_timesteps(1000, 20, "leading") == list(range(950, -1, -50))
    assert strided_timesteps(1000, 30)[0] == 989 and strided_timesteps(1000, 30)[-1] == 32  # stride 33
    abar = ConditionalDiffusion().alphas_cumprod
    # 999, 899.1, ..., 499.5, ..., 99.9 rounded half to even
    assert dpmpp_timesteps(abar, 10) == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    logsnr = dpmpp_timesteps(abar, 10, "logsnr")
    assert logsnr[0] == 999 and len(logsnr) == 10 and logsnr == sorted(logsnr, reverse=True) and logsnr[-1] < 10


def test_progress_bar(untrained, capsys):
    diff, net, condition = untrained
    diff.sample(net, condition, NT, sampler="dpmpp_2m", steps=3, progress=True)
    assert "dpmpp_2m" in capsys.readouterr().err


def test_bad_arguments(untrained):
    diff, net, condition = untrained
    with pytest.raises(ValueError, match="sampler"):
        diff.sample(net, condition, NT, sampler="euler")
    with pytest.raises(ValueError, match="ddpm runs all 100 steps"):
        diff.sample(net, condition, NT, sampler="ddpm", steps=10)
    with pytest.raises(ValueError, match="steps"):
        diff.sample(net, condition, NT, sampler="ddim", steps=101)
    with pytest.raises(ValueError, match="spacing"):
        diff.sample(net, condition, NT, sampler="dpmpp_2m", spacing="trailing")
    with pytest.raises(ValueError, match=r"condition must have shape \(B, 3, N\)"):
        diff.sample(net, condition.transpose(1, 2), NT)


def test_ode_samplers_converge_to_exact_solution_and_dpmpp_is_more_accurate():
    """For Gaussian data the probability-flow ODE has a closed form; DDIM (eta=0) and DPM++ solve it."""
    torch.manual_seed(0)
    diff, s, nt = ConditionalDiffusion(), 0.5, 1000
    condition = torch.randn(2, 3, 8, dtype=torch.float64)
    oracle = GaussianOracle(diff.alphas_cumprod, 8, s)
    mu = condition.mean(dim=2, keepdim=True)
    errors = {}
    for sampler, steps in [("ddim", 10), ("ddim", 20), ("dpmpp_2m", 10), ("dpmpp_2m", 20), ("dpmpp_2m", 50)]:
        out = diff.sample(oracle, condition, nt, sampler, steps, generator=torch.Generator().manual_seed(0))
        x_t = torch.randn(2, 3, nt, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        abar = diff.alphas_cumprod.double()[999]  # both samplers start at t = T - 1 here
        exact = mu + s * (x_t - abar.sqrt() * mu) / (abar * s**2 + 1 - abar).sqrt()
        errors[sampler, steps] = (out[:, :, 8:] - exact).abs().max().item()
    assert errors["ddim", 20] < errors["ddim", 10]
    assert errors["dpmpp_2m", 10] < errors["ddim", 10] and errors["dpmpp_2m", 20] < 0.5 * errors["ddim", 20]
    assert errors["dpmpp_2m", 50] < 0.01


class PredictionOf:
    """The oracle's eps re-expressed as another prediction type: x0 ("sample") or v ("v_prediction")."""

    def __init__(self, oracle, prediction_type):
        self.oracle, self.prediction_type = oracle, prediction_type

    def __call__(self, x, t):
        eps = self.oracle(x, t)
        a, sig = self.oracle.abar[t].sqrt()[:, None, None], (1 - self.oracle.abar[t]).sqrt()[:, None, None]
        x0 = (x - sig * eps) / a
        return x0 if self.prediction_type == "sample" else a * eps - sig * x0


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 10), ("dpmpp_2m", 10)])
def test_prediction_types_give_the_same_samples(prediction_type, sampler, steps):
    """An x0 or v network that is exact gives the same trajectory as the exact eps network."""
    condition = torch.randn(2, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eps_diff, other_diff = ConditionalDiffusion(), ConditionalDiffusion(prediction_type=prediction_type)
    oracle = GaussianOracle(eps_diff.alphas_cumprod, 8, 0.5)
    samples = [
        diff.sample(model, condition, 50, sampler, steps, generator=torch.Generator().manual_seed(1))
        for diff, model in [(eps_diff, oracle), (other_diff, PredictionOf(oracle, prediction_type))]
    ]
    torch.testing.assert_close(samples[1], samples[0], atol=1e-4, rtol=1e-4)


def test_ddpm_samples_the_data_distribution():
    """Ancestral DDPM with the exact eps of N(mu, s^2) data must return points with that mean and std."""
    diff, s = ConditionalDiffusion(), 0.5
    condition = torch.randn(1, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    oracle = GaussianOracle(diff.alphas_cumprod, 8, s)
    out = diff.sample(oracle, condition, 10000, "ddpm", generator=torch.Generator().manual_seed(1))[0, :, 8:]
    torch.testing.assert_close(out.mean(dim=1), condition[0].mean(dim=1), atol=0.02, rtol=0)
    torch.testing.assert_close(out.std(dim=1), torch.full((3,), s, dtype=torch.float64), atol=0.02, rtol=0)


NC_TOY, NT_TOY = 32, 32


def semicircles(b, generator):
    """(B, 3, NC + NT): lower half of a circle of random radius in [1, 2.5] (condition), then the upper half."""
    radius = 1.0 + 1.5 * torch.rand(b, 1, generator=generator)

    def arc(n, start):
        angle = (start + torch.rand(b, n, generator=generator)) * math.pi
        return torch.stack([radius * angle.cos(), radius * angle.sin(), torch.zeros(b, n)], dim=1)

    return torch.cat([arc(NC_TOY, 1.0), arc(NT_TOY, 0.0)], dim=2), radius[:, 0]



ALL_SAMPLERS = [("ddim", 20), ("dpmpp_2m", 10), ("ddpm", None)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "prediction_type, samplers",
    # x0 prediction after 300 steps is still too coarse for DDPM's last ancestral steps (Chamfer ratio
    # 0.36 against 0.16 with eps; docs/history/training_notebook.md), so it is held to the deterministic samplers here
    [("epsilon", ALL_SAMPLERS), ("v_prediction", ALL_SAMPLERS), ("sample", ALL_SAMPLERS[:2])],
)
def test_trained_model_completes_semicircles(prediction_type, samplers):
    """Train 300 Adam steps on a toy completion task; every sampler must land on the right circle."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    diff, net = ConditionalDiffusion(prediction_type=prediction_type), PointNetEps(NC_TOY)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(300):
        loss = diff.training_loss(net, semicircles(64, g)[0], NC_TOY, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()

    clouds, radius = semicircles(16, torch.Generator().manual_seed(1))
    target = clouds[:, :, NC_TOY:].transpose(1, 2)
    lo, hi = target.amin(dim=1, keepdim=True), target.amax(dim=1, keepdim=True)
    uniform = lo + (hi - lo) * torch.rand(target.shape, generator=torch.Generator().manual_seed(2))
    baseline = chamfer_distance(uniform, target).mean()
    for sampler, steps in samplers:
        generator = torch.Generator().manual_seed(3)
        out = diff.sample(net, clouds[:, :, :NC_TOY], NT_TOY, sampler, steps, generator=generator)
        generated = out[:, :, NC_TOY:].transpose(1, 2)
        assert chamfer_distance(generated, target).mean() < 0.3 * baseline, sampler
        # conditioning: the generated arc has the condition's radius (radii span 1 .. 2.5)
        assert (generated.norm(dim=2).mean(dim=1) - radius).abs().mean() < 0.15, sampler
        assert (generated[:, :, 1] > -0.2).float().mean() > 0.9, sampler  # upper half


@pytest.mark.parametrize("sampler, steps", [("ddim", 10), ("dpmpp_2m", 10)])
def test_clip_x0_bounds_samples_of_a_poor_model(sampler, steps):
    """A model that under-predicts eps blows x0 up by ~1/sqrt(abar_T); clip_x0 keeps samples in range."""

    def shrunken_eps(x, t):
        return 0.8 * x  # x_T is almost pure noise, so the true eps is ~x: this model is 20% off

    condition = torch.zeros(1, 3, 8)
    gen = torch.Generator().manual_seed(0)
    wild = ConditionalDiffusion().sample(shrunken_eps, condition, 32, sampler=sampler, steps=steps, generator=gen)
    gen = torch.Generator().manual_seed(0)
    clipped = ConditionalDiffusion(clip_x0=3.0).sample(
        shrunken_eps, condition, 32, sampler=sampler, steps=steps, generator=gen
    )
    assert wild[:, :, 8:].abs().max() > 4.0
    assert clipped[:, :, 8:].abs().max() <= 3.0 + 1e-4
