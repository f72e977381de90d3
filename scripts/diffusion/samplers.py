"""Reverse-process loops for the generated (target) points: DDPM, DDIM and DPM-Solver++ 2M.

Every loop works on the target part only, x (B, 3, Nt), and gets the denoiser as
``model_fn(x (B, 3, Nt), t: int) -> out (B, 3, Nt)``, a closure that puts the fixed condition
points in front, so the known points are restored before every network call by construction.
``out`` is what the network predicts: noise ("epsilon"), the clean points ("sample") or
v = alpha * eps - sigma * x0 ("v_prediction"); the schedulers are built with the same type.
DDPM and DDIM steps are MONAI's schedulers (their ``step`` is elementwise and works on any
shape); DPM-Solver++ has no MONAI counterpart and is written here.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from tqdm import tqdm

ModelFn = Callable[[torch.Tensor, int], torch.Tensor]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

SPACINGS = ("trailing", "leading")


def strided_timesteps(num_train_timesteps: int, steps: int, spacing: str = "trailing") -> list[int]:
    """Descending timesteps with the constant stride ``s = T // steps`` that MONAI's DDIM step assumes.

    ``leading``: 0, s, ..., (steps-1)s (the DDIM paper's "uniform" skip);
    ``trailing``: s-1, 2s-1, ..., steps*s-1 (starts at T-1 when T % steps == 0; Lin et al. 2024).
    Either way the last step moves from t < s to the clean sample (alpha_cumprod = 1).
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    stride = num_train_timesteps // steps
    offset = stride - 1 if spacing == "trailing" else 0
    return [offset + i * stride for i in reversed(range(steps))]


def ddpm_loop(
    model_fn: ModelFn, x: torch.Tensor, scheduler: DDPMScheduler, generator: torch.Generator | None, progress: bool
) -> torch.Tensor:
    """Ancestral sampling over all T steps, fixed-small variance, no x0 clipping (as PVD / PCDiff)."""
    for t in tqdm(range(scheduler.num_train_timesteps - 1, -1, -1), desc="ddpm", disable=not progress):
        x, _ = scheduler.step(model_fn(x, t), t, x, generator=generator)
    return x


def ddim_loop(
    model_fn: ModelFn,
    x: torch.Tensor,
    scheduler: DDIMScheduler,
    steps: int,
    spacing: str,
    eta: float,
    generator: torch.Generator | None,
    progress: bool,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) over ``strided_timesteps``; eta=0 is deterministic given x."""
    timesteps = strided_timesteps(scheduler.num_train_timesteps, steps, spacing)
    scheduler.set_timesteps(steps)  # fixes the stride T // steps used by step() for the previous timestep
    for t in tqdm(timesteps, desc="ddim", disable=not progress):
        x, _ = scheduler.step(model_fn(x, t), t, x, eta=eta, generator=generator)
    return x


def _log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma) with alpha^2 = alphas_cumprod, sigma^2 = 1 - alphas_cumprod."""
    return 0.5 * (alphas_cumprod.log() - (1.0 - alphas_cumprod).log())


def dpmpp_timesteps(alphas_cumprod: torch.Tensor, steps: int, spacing: str = "linspace") -> list[int]:
    """Descending network-call timesteps for DPM-Solver++; the sampler then steps to the clean sample.

    ``linspace``: the first ``steps`` of ``steps + 1`` uniformly spaced times from T-1 to 0, rounded
    (diffusers' "linspace"); ``logsnr``: the same uniform in lambda = log(alpha / sigma), each mapped
    to the nearest discrete timestep (Lu et al.'s "logSNR"). Repeated timesteps (logsnr beyond
    ~50 steps for T = 1000) are dropped, so there may be fewer calls than ``steps``.
    """
    num_train = alphas_cumprod.numel()
    if not 1 <= steps <= num_train:
        raise ValueError(f"steps must be in [1, {num_train}], got {steps}")
    if spacing == "linspace":
        nearest = torch.linspace(num_train - 1, 0, steps + 1, dtype=torch.float64)[:-1].round().long()
    elif spacing == "logsnr":
        lam = _log_snr(alphas_cumprod.double().cpu())
        targets = torch.linspace(float(lam[-1]), float(lam[0]), steps + 1, dtype=torch.float64)[:-1]
        nearest = (lam[None, :] - targets[:, None]).abs().argmin(dim=1)
    else:
        raise ValueError(f"dpmpp_2m spacing must be 'linspace' or 'logsnr', got {spacing!r}")
    return torch.unique_consecutive(nearest).tolist()


def data_prediction(out: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float, prediction_type: str) -> torch.Tensor:
    """The x0 estimate implied by the network output ``out`` at x_t = alpha * x0 + sigma * eps."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha
    if prediction_type == "sample":
        return out
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def dpmpp_2m_loop(
    model_fn: ModelFn,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    spacing: str,
    progress: bool,
    clip_x0: float | None = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction, on the discrete schedule.

    At each timestep of ``dpmpp_timesteps``: alpha = sqrt(alphas_cumprod[t]), sigma =
    sqrt(1 - alphas_cumprod[t]), lambda = log(alpha / sigma). Steps between network calls are
    second order (multistep) except the first; the last step goes to the clean sample
    (sigma = 0, lambda = inf), where only the first-order update is finite: it returns the
    data prediction of the last call. ``clip_x0`` clamps every data prediction to +-clip_x0.
    """
    timesteps = dpmpp_timesteps(alphas_cumprod, steps, spacing)
    abar = alphas_cumprod.double().cpu()[timesteps]
    alpha, sigma, lam = abar.sqrt().tolist(), (1.0 - abar).sqrt().tolist(), _log_snr(abar).tolist()
    prev_d = None
    for i, t in enumerate(tqdm(timesteps, desc="dpmpp_2m", disable=not progress)):
        d = data_prediction(model_fn(x, t), x, alpha[i], sigma[i], prediction_type)
        if clip_x0 is not None:
            d = d.clamp(-clip_x0, clip_x0)
        if i == len(timesteps) - 1:
            break
        h = lam[i + 1] - lam[i]
        if prev_d is None:
            d_step = d
        else:
            r = (lam[i] - lam[i - 1]) / h
            d_step = (1.0 + 0.5 / r) * d - (0.5 / r) * prev_d
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * d_step
        prev_d = d
    return d
