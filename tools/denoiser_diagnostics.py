"""Where a denoiser's error comes from, on the quality study's held-out cases (docs/history/training_notebook.md).

``per_timestep``: noise the true implant points to timestep t (OT-paired noise, as in training) and
compare the network's x0 estimate with the true points, next to the estimate that needs no network,
x_t / sqrt(abar) (RMS distance, voxels). ``points``: sample the implant points as inference does and
measure them against the true implant surface (median / 90th percentile distance to the truth, the
share of "strays" more than 5 voxels off, and the coverage of the truth by the samples).
``trajectory``: sample as inference does and score the x0 estimate of every sampler step against the
true implant points (radial offset and Chamfer distance, voxels): at which step the shape is decided.

    python -m tools.denoiser_diagnostics per_timestep --dataset_dir data/synth128
    python -m tools.denoiser_diagnostics points --dataset_dir data/synth128 --steps 10 \
        --denoiser_weights runs/v.pt --prediction_type v_prediction
    python -m tools.denoiser_diagnostics trajectory --dataset_dir data/synth128 --num_cases 20 --steps 10
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from scipy.spatial import cKDTree

from scripts.cases import case_datalist
from scripts.data.points import denormalize_points, normalization_params, normalize_points
from scripts.diffusion.chamfer import chamfer_distance
from scripts.diffusion.pairing import pair_noise
from scripts.diffusion.samplers import data_prediction
from tools.quality_study import _workflow, held_out_cases, true_implant_points

STRAY_VOXELS = 5.0


def _cases(dataset_dir: str, num_cases: int, num_truth_points: int | None, **overrides) -> Iterator[tuple]:
    """(generator, defective cube mask, true implant surface points (M, 3) voxel coords) per held-out case;
    ``overrides`` go to configs/inference.json. M = the generator's num_target unless given."""
    workflow = _workflow("inference.json", progress=False, **overrides)
    generator, preprocessing = (workflow.parser.get_parsed_content(k) for k in ("inferer", "preprocessing"))
    cases = held_out_cases(dataset_dir, num_cases)
    for case, entry in zip(cases, case_datalist(cases)):
        cube = preprocessing(entry)["image"]  # the skull in its canonical cube
        defective = np.asarray(cube[0]) > 0
        truth = true_implant_points(case["implant"], np.asarray(cube.affine), defective.shape[0],
                                    num_truth_points or generator.num_target)
        yield generator, defective, truth


def per_timestep(dataset_dir: str, num_cases: int = 10, timesteps: Sequence[int] = (5, 20, 50, 100, 200, 300, 500, 700, 900, 999),
                 seed: int = 0, **overrides) -> dict:
    """{t: [network RMS, no-network RMS]} in voxels, averaged over cases (one noise draw per case and t)."""
    rms = {int(t): [] for t in timesteps}
    noise_gen = torch.Generator().manual_seed(seed)
    for generator, defective, truth in _cases(dataset_dir, num_cases, None, **overrides):
        diffusion, nc = generator.diffusion, generator.num_condition
        condition = torch.from_numpy(generator.condition_points(defective)[1][0])
        center, scale = normalization_params(condition)
        x0 = torch.cat([normalize_points(condition, center, scale),
                        normalize_points(torch.from_numpy(truth), center, scale)]).T[None].float()  # (1, 3, N)
        target = x0[:, :, nc:]
        for t in rms:
            noise = pair_noise(torch.randn(target.shape, generator=noise_gen), target, "ot")
            xt = diffusion.q_sample(x0, torch.tensor([t]), noise, nc)
            with torch.no_grad():
                out = generator.denoiser(xt, torch.tensor([t]))[:, :, nc:]
            abar = float(diffusion.alphas_cumprod[t])
            estimate = data_prediction(out, xt[:, :, nc:], abar**0.5, (1 - abar) ** 0.5, diffusion.prediction_type)
            no_network = xt[:, :, nc:] / abar**0.5
            rms[t].append([float(((e - target) ** 2).sum(1).mean().sqrt() * scale) for e in (estimate, no_network)])
    result = {t: np.mean(v, axis=0).round(2).tolist() for t, v in rms.items()}
    print(json.dumps(result))
    return result


def _radial_offset(points: np.ndarray, truth: np.ndarray, centre: np.ndarray) -> float:
    """Mean distance of ``points`` (M, 3) from ``centre`` (3,) minus that of ``truth`` (T, 3):
    > 0 when a whole implant sits too far out, < 0 too far in."""
    return float(np.linalg.norm(points - centre, axis=1).mean() - np.linalg.norm(truth - centre, axis=1).mean())


def points(dataset_dir: str, num_cases: int = 10, num_truth_points: int = 3000, **overrides) -> dict:
    """Mean over cases of the sampled implant points' distance to the truth (voxels): median, p90,
    max, stray share (> 5 voxels), coverage (truth -> nearest sample) median and p90, and the
    radial offset: mean distance of the samples from the condition's centre minus that of the true
    points (a whole implant placed too far out > 0, too far in < 0), signed and absolute."""
    rows = []
    for generator, defective, truth in _cases(dataset_dir, num_cases, num_truth_points, **overrides):
        clouds, generated = generator.complete_points(defective)
        off = cKDTree(truth).query(generated[0])[0]
        cover = cKDTree(generated[0]).query(truth)[0]
        radial = _radial_offset(generated[0], truth, clouds[0, : generator.num_condition].mean(axis=0))
        rows.append([np.median(off), np.percentile(off, 90), off.max(), (off > STRAY_VOXELS).mean(),
                     np.median(cover), np.percentile(cover, 90), radial, abs(radial)])
    names = ("median", "p90", "max", "strays", "coverage_median", "coverage_p90", "radial_offset", "radial_offset_abs")
    result = dict(zip(names, np.mean(rows, axis=0).round(3).tolist()))
    print(json.dumps(result))
    return result


class _Recorder(torch.nn.Module):
    """Wraps a denoiser and keeps every call's (x (B, 3, N), t (B,), output (B, 3, N))."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        super().__init__()
        self.denoiser, self.calls = denoiser, []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.denoiser(x, t)
        self.calls.append((x, t, out))
        return out


def trajectory(dataset_dir: str, num_cases: int = 10, **overrides) -> dict:
    """{t: [mean |radial offset|, mean Chamfer]} in voxels over cases, for the x0 estimate of each
    sampler step (member 0), scored against the true implant points (the generator's num_target)."""
    rows = []
    for generator, defective, truth in _cases(dataset_dir, num_cases, None, **overrides):
        recorder = _Recorder(generator.denoiser)
        generator.denoiser = recorder
        try:
            clouds, _ = generator.complete_points(defective)
        finally:
            generator.denoiser = recorder.denoiser
        nc, diffusion = generator.num_condition, generator.diffusion
        condition = torch.from_numpy(clouds[:1, :nc]).double()  # (1, Nc, 3): member 0, as sampled
        center, scale = normalization_params(condition)
        truth_t, row = torch.from_numpy(truth).double()[None], []
        for x, t, out in recorder.calls:
            abar = float(diffusion.alphas_cumprod[int(t[0])])
            estimate = data_prediction(out[:1, :, nc:], x[:1, :, nc:], abar**0.5, (1 - abar) ** 0.5, diffusion.prediction_type)
            estimate = denormalize_points(estimate.transpose(1, 2).double(), center, scale)  # (1, Nt, 3) voxels
            chamfer = float(chamfer_distance(estimate, truth_t, squared=False)[0])
            radial = _radial_offset(estimate[0].numpy(), truth, condition[0].numpy().mean(axis=0))
            row.append((int(t[0]), abs(radial), chamfer))
        rows.append(row)
    steps = np.array(rows)  # (cases, steps, 3)
    result = {int(t): v.round(2).tolist() for t, v in zip(steps[0, :, 0], steps[:, :, 1:].mean(axis=0))}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    import fire

    fire.Fire({"per_timestep": per_timestep, "points": points, "trajectory": trajectory})
