"""The implant generator: a defective skull on an isotropic cube grid -> implant ensemble.

The diffusion sampler completes the skull's surface points (``num_samples`` members in one batch, each
with its own draw of the points), the SAP network predicts oriented points for every member and DPSR
solves for the indicator at the cube's full resolution -> complete skull -> implant (subtract, clean);
ensemble statistics (the mean implant, probability, variance) on the model grid. The anatomical priors
(:class:`~scripts.priors.AnatomicalPriors`, the config's ``priors``) complete the sampled points before the
voxelizer and the members' masks after it. Mapping back to the input grid and writing the results are the
inference config's postprocessing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import Inferer

from scripts.data.points import (
    denormalize_points,
    mask_to_surface_points,
    mirror_over_openings,
    normalization_params,
    normalize_points,
)
from scripts.implant import ensemble_mean_and_variance, postprocess_ensemble
from scripts.io import mask3d
from scripts.priors import AnatomicalPriors, CasePriors
from scripts.networks.dpsr import DPSR, voxel_to_unit

__all__ = ["ImplantGenerator"]

# an ensemble whose members bring their own probabilities of bone (the priors' soft surfaces) keeps the voxels of
# mean probability >= SOFT_VOTE: the members' majority vote was slightly thin (bone at p 0.1-0.5 more often than
# p says); chosen on 15 validation cases x 5 members among 0.3-0.6 (DSC 0.854 / 0.858 / 0.848 / 0.817 at 0.3 / 0.4 /
# 0.5 / 0.6 on the resampled probability, the majority vote 0.847; in the pipeline, on the model grid, 0.852)
SOFT_VOTE = 0.4
# a generator without priors reports them all off in its summary
NO_PRIORS = AnatomicalPriors(mirror=False, shell=False, fill=False, mirrored_openings=False)


class ImplantGenerator(Inferer):
    """Diffusion completion + SAP voxelization of one defective skull on an isotropic grid: the
    inference config's ``inferer``.

    Args:
        denoiser: ``model(x (B, 3, N), t (B,)) -> eps (B, 3, N)``.
        voxelizer: :class:`~scripts.networks.sap.SAPVoxelizer`.
        diffusion: :class:`~scripts.diffusion.process.ConditionalDiffusion`.
        num_condition, num_target: points given / generated (the denoiser's preset).
        sampler, steps: sampler name and network calls (``steps`` ignored by "ddpm").
        eta: DDIM's noise scale (0: deterministic DDIM; 1: fresh noise at every step); the other
            samplers ignore it (their noise is fixed by the method), and it is recorded as 0 for them.
        num_samples: ensemble members, sampled in one batch.
        seed: seeds surface sampling, condition draw and sampler noise (member k draws its condition
            with seed + k).
        surface_points: Poisson-disk points drawn on the defective skull before the condition draw.
        margin: voxels of padding around the volume inside the periodic DPSR cube.
        max_distance_vox: implant voxels farther than this from the generated points are dropped.
        dilate: dilations of each complete-skull mask (the reference dilates once at 0.4 mm voxels;
            at coarser grids one voxel is a lot of bone, so the small preset uses 0).
        priors: :class:`~scripts.priors.AnatomicalPriors`: after sampling, each member's implant points are
            merged with a prior's estimate of the missing bone (:meth:`~scripts.priors.AnatomicalPriors.merge`),
            and after the voxelizer its masks take the prior's voxels
            (:meth:`~scripts.priors.AnatomicalPriors.voxels`); None: the diffusion sample alone.
    """

    def __init__(
        self,
        denoiser: torch.nn.Module,
        voxelizer: torch.nn.Module,
        diffusion,
        num_condition: int,
        num_target: int,
        sampler: str = "ddim",
        steps: int | None = 50,
        eta: float = 0.0,
        num_samples: int = 1,
        seed: int = 0,
        surface_points: int | None = None,
        margin: int = 8,
        max_distance_vox: float = 10.0,
        dilate: int = 1,
        device: str | torch.device = "cpu",
        progress: bool = True,
        priors: AnatomicalPriors | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.device = torch.device(device)
        self.denoiser = denoiser.to(self.device).eval()
        self.voxelizer = voxelizer.to(self.device).eval()
        self.diffusion = diffusion
        self.num_condition, self.num_target = int(num_condition), int(num_target)
        self.num_mirror = int(getattr(denoiser, "config", {}).get("num_mirror", 0))
        self.sampler, self.steps = sampler, (None if sampler == "ddpm" else steps)
        self.eta = float(eta) if sampler == "ddim" else 0.0
        self.num_samples, self.seed = int(num_samples), int(seed)
        self.surface_points = int(surface_points or 4 * num_condition)
        self.margin, self.max_distance_vox, self.dilate = int(margin), float(max_distance_vox), int(dilate)
        self.progress = progress
        self.priors = priors

    def condition_points(self, defective: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Defective mask (X, Y, Z) -> each member's skull points and the denoiser's condition, both (K, Nc, 3)
        voxel coords: member k draws ``surface_points`` Poisson-disk points with seed ``seed + k`` and keeps a
        random num_condition. A mirror-conditioned denoiser (``num_mirror`` > 0) gets the first
        Nc - num_mirror of them and a random num_mirror of the skull's mirror image over the openings
        (:func:`~scripts.data.points.mirror_over_openings`; the mask is the canonical cube), as in training.

        Own draws make the members differ in what they see of the skull, not only in their noise
        (docs/history/benchmarks_by_version.md has the 5-member vote with own and with shared draws).
        """
        skulls, conditions = [], []
        for seed in range(self.seed, self.seed + self.num_samples):
            surface = mask_to_surface_points(defective, self.surface_points, seed=seed)
            rng = np.random.default_rng(seed)
            skull = surface[rng.choice(len(surface), self.num_condition, replace=len(surface) < self.num_condition)]
            condition = skull
            if self.num_mirror:
                mirror = mirror_over_openings(surface, defective.shape[0], self.num_mirror)
                drawn = mirror[rng.choice(len(mirror), self.num_mirror, replace=len(mirror) < self.num_mirror)]
                condition = np.concatenate([skull[: self.num_condition - self.num_mirror], drawn])
            skulls.append(skull)
            conditions.append(condition)
        return np.stack(skulls), np.stack(conditions)

    @torch.no_grad()
    def complete_points(self, defective: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Defective mask (X, Y, Z) -> completed clouds (K, N, 3) voxel coords and the generated
        part (K, num_target, 3); member k's skull points are the first num_condition points of cloud k.
        Each member is normalised by its own condition; all are sampled in one batch."""
        skulls, conditions = self.condition_points(defective)
        conditions = torch.from_numpy(conditions).to(self.device)  # (K, Nc, 3)
        center, scale = normalization_params(conditions)  # (K, 3), (K,)
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        clouds = self.diffusion.sample(
            self.denoiser, normalize_points(conditions, center, scale).transpose(1, 2), self.num_target,
            sampler=self.sampler, steps=self.steps, eta=self.eta, generator=generator, progress=self.progress,
        )
        clouds = denormalize_points(clouds.transpose(1, 2), center, scale).cpu().numpy()
        if self.num_mirror:
            clouds[:, : self.num_condition] = skulls
        return clouds, clouds[:, self.num_condition :]

    @torch.no_grad()
    def indicators(self, clouds: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
        """Completed clouds (K, N, 3) in voxel coords of a cube of side max(shape) -> indicator
        grids (K, s, s, s) at full resolution (inside < 0), one member at a time to bound memory."""
        side = max(shape)
        dpsr = DPSR(side, sigma=self.voxelizer.config["sigma"])
        grids = []
        for cloud in clouds:
            unit = voxel_to_unit(torch.from_numpy(cloud).float(), shape).clamp(0.0, (side - 1) / side)
            points, normals = self.voxelizer.oriented_points(unit[None].to(self.device), res=side)
            grids.append(dpsr(points, normals)[0].cpu())
        return torch.stack(grids)

    def __call__(self, inputs, network: torch.nn.Module | None = None) -> dict:
        """Defective mask on an isotropic cube grid ((X, Y, Z) or (1, X, Y, Z), numpy or torch) -> dict with
        "completes" (K, X, Y, Z) bool, "implants" (K, X, Y, Z) bool, "implant_mean" bool,
        "probability"/"variance" float32 (None for K = 1), "points" (K, N, 3), "priors" (the case's
        :class:`~scripts.priors.CasePriors`, None without priors), "timings" (s) and "settings" (sampler,
        steps, eta, network calls, priors, ... for the case summary).

        ``network`` is there for MONAI's Inferer interface: an evaluator passes its network, which
        must be this generator's denoiser.
        """
        if network is not None and network is not self.denoiser:
            raise ValueError("ImplantGenerator: the evaluator's network must be the generator's denoiser")
        defective = mask3d(inputs, "defective skull")
        timings = {}
        start = time.perf_counter()
        clouds, generated = self.complete_points(defective)
        timings["diffusion"] = time.perf_counter() - start
        priors = None
        if self.priors is not None and self.priors.enabled:
            start = time.perf_counter()
            clouds, priors = self.priors.merge(defective, clouds, self.num_condition, self.seed)
            generated = clouds[:, self.num_condition :]
            timings["priors"] = time.perf_counter() - start
        start = time.perf_counter()
        grids = self.indicators(clouds, defective.shape)
        timings["voxelization"] = time.perf_counter() - start
        start = time.perf_counter()
        result = postprocess_ensemble(grids.numpy(), defective, generated, self.dilate, self.max_distance_vox)
        if priors is not None:
            members = self.priors.voxels(priors, defective, generated, result["completes"], result["implants"])
            if members is not None:  # the mean implant is then the members' mean probability >= SOFT_VOTE
                result = self._with_members(result, *members)
        timings["postprocessing"] = time.perf_counter() - start
        return {**result, "points": clouds, "priors": priors, "timings": timings, "settings": self.settings(priors)}

    @staticmethod
    def _with_members(result: dict, completes: np.ndarray, implants: np.ndarray,
                      probabilities: np.ndarray | None = None) -> dict:
        """``result`` with new member masks (K, X, Y, Z) and, for K > 1, the mean implant (their majority vote),
        probability and variance made from their masks (:func:`~scripts.implant.ensemble_mean_and_variance`), or from
        the members' own ``probabilities`` of bone (K, X, Y, Z) where given: their mean p, p (1 - p) and the
        mean implant p >= ``SOFT_VOTE``."""
        if len(implants) == 1:
            return {**result, "completes": completes, "implants": implants, "implant_mean": implants[0]}
        if probabilities is None:
            mean, probability, variance = ensemble_mean_and_variance(implants)
        else:
            probability = probabilities.mean(axis=0)
            mean, variance = probability >= SOFT_VOTE, probability * (1.0 - probability)
        return {**result, "completes": completes, "implants": implants, "implant_mean": mean,
                "probability": probability, "variance": variance}

    def settings(self, priors: CasePriors | None = None) -> dict:
        """The sampling settings of a run and its ``priors`` (None: none ran), as the case summary reports them."""
        return {
            "num_samples": self.num_samples,
            "sampler": self.sampler,
            "steps": self.steps if self.sampler != "ddpm" else self.diffusion.num_timesteps,
            "eta": self.eta,
            "network_calls": self.diffusion.last_model_calls,
            "seed": self.seed,
            "device": str(self.device),
            **(self.priors if self.priors is not None else NO_PRIORS).settings(priors),
        }
