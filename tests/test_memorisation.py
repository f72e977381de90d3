"""A tiny denoiser memorises one case: guards the training mechanics (loss, pairing, sampler) end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts.data.points import mask_to_surface_points, normalization_params, normalize_points
from scripts.data.synthetic import skullbreak_case
from scripts.diffusion.chamfer import chamfer_distance
from scripts.diffusion.process import ConditionalDiffusion
from scripts.networks.pvcnn2 import PRESETS, PVCNN2Denoiser

NUM_CONDITION = PRESETS["tiny"]["num_condition"]
NUM_TARGET = PRESETS["tiny"]["num_points"] - NUM_CONDITION


def _chamfer_vox(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Chamfer distance of two (N, 3) clouds, in their units."""
    return chamfer_distance(torch.as_tensor(a, dtype=torch.float32)[None], torch.as_tensor(b, dtype=torch.float32)[None],
                            squared=False).item()


@pytest.mark.slow
def test_tiny_denoiser_memorises_one_case_with_ot_pairing():
    """300 steps (x0 prediction, OT pairing, the shipped recipe's optimiser) on one 40^3 skull: DDIM-20
    samples lie within 3.4 voxels (Chamfer) of the true implant points, against 4.1 for random points
    in the implant's bounding box and about 2.5 for a second Poisson-disk draw of the true surface.
    Measured: 2.9."""
    defective, implant = skullbreak_case(0, 40, 0).defect("parietotemporal")
    condition = mask_to_surface_points(defective, NUM_CONDITION, seed=0)
    target = mask_to_surface_points(implant, NUM_TARGET, seed=0)
    center, scale = normalization_params(condition)
    cloud = np.concatenate([normalize_points(condition, center, scale), normalize_points(target, center, scale)])
    x0 = torch.as_tensor(cloud, dtype=torch.float32).T[None].expand(4, -1, -1)

    torch.manual_seed(0)
    net = PVCNN2Denoiser("tiny", dropout=0.0, head_dropout=0.0)
    diffusion = ConditionalDiffusion(prediction_type="sample", pairing="ot", clip_x0=4.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3, betas=(0.9, 0.999))
    generator = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(300):
        optimizer.zero_grad()
        diffusion.training_loss(net, x0, NUM_CONDITION, generator=generator).backward()
        optimizer.step()

    net.eval()
    sample = diffusion.sample(net, x0[:1, :, :NUM_CONDITION], NUM_TARGET, sampler="ddim", steps=20,
                              generator=torch.Generator().manual_seed(1))
    generated = sample[0, :, NUM_CONDITION:].T.numpy() * scale + center
    lo, hi = target.min(0), target.max(0)
    in_box = lo + (hi - lo) * np.random.default_rng(0).random(target.shape)
    chamfer, box = _chamfer_vox(generated, target), _chamfer_vox(in_box, target)
    print(f"memorised one case: Chamfer {chamfer:.2f} voxels (random in the implant box: {box:.2f})")
    assert chamfer < 3.4 < box
