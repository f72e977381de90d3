"""Ignite iteration functions of the bundle's trainers and evaluators.

The trainers themselves are MONAI ``SupervisedTrainer`` / ``SupervisedEvaluator`` engines wired in
``configs/train_*.json``; the classes here are what those engines call every iteration.
"""

from __future__ import annotations

import torch
from monai.utils import CommonKeys

from scripts.diffusion.chamfer import chamfer_distance
from scripts.distributed import unwrap


# ----------------------------------------------------------------------------- diffusion steps
def points_batch(batch: dict, device: torch.device, condition_key: str, target_key: str) -> torch.Tensor:
    """Condition (B, Nc, 3) and target (B, Nt, 3) -> model layout (B, 3, Nc + Nt), condition first."""
    cloud = torch.cat([batch[condition_key], batch[target_key]], dim=1)
    return cloud.to(device=device, dtype=torch.float32).transpose(1, 2).contiguous()


class DiffusionTrainStep:
    """``iteration_update`` of the diffusion trainer: one optimiser step on the denoising loss.

    The batch holds "condition" (B, Nc, 3) and "target" (B, Nt, 3) normalised points.
    """

    def __init__(self, diffusion, condition_key: str = "condition", target_key: str = "target") -> None:
        self.diffusion = diffusion
        self.condition_key = condition_key
        self.target_key = target_key

    def __call__(self, engine, batch: dict) -> dict:
        x0 = points_batch(batch, engine.state.device, self.condition_key, self.target_key)
        num_condition = batch[self.condition_key].shape[1]
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        loss = self.diffusion.training_loss(engine.network, x0, num_condition)
        loss.backward()
        engine.optimizer.step()
        return {CommonKeys.LOSS: loss.detach()}


class DiffusionValStep:
    """``iteration_update`` of the diffusion evaluator: sample the target points, score them.

    Returns {"chamfer": (B,)} the symmetric (non-squared) Chamfer distance between generated and
    true target points in the points' original units (voxels or mm: normalised distance x scale).
    """

    def __init__(
        self,
        diffusion,
        sampler: str = "ddim",
        steps: int = 20,
        seed: int = 0,
        condition_key: str = "condition",
        target_key: str = "target",
    ) -> None:
        self.diffusion = diffusion
        self.sampler = sampler
        self.steps = steps
        self.seed = seed
        self.condition_key = condition_key
        self.target_key = target_key

    @torch.no_grad()
    def __call__(self, engine, batch: dict) -> dict:
        device = engine.state.device
        condition = batch[self.condition_key].to(device=device, dtype=torch.float32).transpose(1, 2)
        target = batch[self.target_key].to(device=device, dtype=torch.float32)
        generator = torch.Generator(device=device).manual_seed(self.seed)
        network = unwrap(engine.network)  # no DDP collectives: validation may run on rank 0 only
        network.eval()
        steps = None if self.sampler == "ddpm" else self.steps
        cloud = self.diffusion.sample(
            network, condition, target.shape[1], sampler=self.sampler, steps=steps, generator=generator
        )
        generated = cloud[:, :, condition.shape[2] :].transpose(1, 2)
        scale = batch["norm_scale"].to(device=device, dtype=torch.float32).reshape(-1)
        chamfer = chamfer_distance(generated, target, squared=False) * scale
        return {"chamfer": chamfer}


# ----------------------------------------------------------------------------- voxelizer steps
class VoxelizerTrainStep:
    """``iteration_update`` of the voxelizer trainer: SAP forward on "points" (B, N, 3) in the unit
    cube, loss against "indicator" (B, r, r, r), one optimiser step."""

    def __init__(self, loss_function, points_key: str = "points", target_key: str = "indicator") -> None:
        self.loss_function = loss_function
        self.points_key, self.target_key = points_key, target_key

    def __call__(self, engine, batch: dict) -> dict:
        points = batch[self.points_key].to(engine.state.device, dtype=torch.float32)
        target = batch[self.target_key].to(engine.state.device, dtype=torch.float32)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_function(engine.network(points)["indicator"], target)
        loss.backward()
        engine.optimizer.step()
        return {CommonKeys.LOSS: loss.detach()}


class VoxelizerValStep:
    """``iteration_update`` of the voxelizer evaluator: predicted mask (indicator <= 0) and true mask
    (target < 0) as (B, 1, r, r, r) under CommonKeys.PRED / LABEL, for MONAI's Dice handler."""

    def __init__(self, points_key: str = "points", target_key: str = "indicator") -> None:
        self.points_key, self.target_key = points_key, target_key

    @torch.no_grad()
    def __call__(self, engine, batch: dict) -> dict:
        network = unwrap(engine.network)
        network.eval()
        points = batch[self.points_key].to(engine.state.device, dtype=torch.float32)
        indicator = network(points)["indicator"]
        target = batch[self.target_key].to(engine.state.device)
        return {CommonKeys.PRED: (indicator <= 0).float()[:, None], CommonKeys.LABEL: (target < 0).float()[:, None]}
