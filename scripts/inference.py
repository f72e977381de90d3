"""Defective skull (mask or CT) -> implant ensemble: the bundle's main job (``configs/inference.json``).

Per case (one NRRD/NIfTI file):

1. load + validate the mask, or derive it from a CT (``scripts.ct``); anisotropic volumes are
   resampled to isotropic voxels;
2. pad to a cube with a margin (the DPSR grid is periodic: the margin keeps the skull away from
   its wrap-around) and sample surface points of the defective skull (the condition);
3. the diffusion sampler completes the condition with the missing points, ``num_samples`` members
   in one batch;
4. the SAP network predicts oriented points for every member and DPSR solves for the indicator at
   the padded cube's full resolution -> complete skull -> implant (subtract, clean);
5. ensemble statistics (majority vote, probability, variance), mapped back to the input grid;
6. outputs written atomically into ``<output_dir>/<case_id>/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from tqdm.auto import tqdm

from scripts.cli import BatchError
from scripts.ct import DEFAULT_BONE_HU, check_bone_threshold, check_input_type, load_skull
from scripts.data.datalist import case_id
from scripts.data.points import denormalize_points, mask_to_surface_points, normalization_params, normalize_points
from scripts.data.resample import crop_from_cube, pad_to_cube, to_isotropic, to_original_grid
from scripts.export import save_preview, save_stl
from scripts.implant import postprocess_ensemble, require_implant
from scripts.io import MASK_SUFFIXES, atomic_folder, atomic_write, is_isotropic, mask_spacing, mask_suffix, save_mask
from scripts.networks.dpsr import DPSR, voxel_to_unit

logger = logging.getLogger(__name__)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (recorded in summaries so results name the exact weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_inputs(source: str | os.PathLike | Sequence) -> list[Path]:
    """A mask file, a folder of mask files, or a list of files -> sorted list of mask paths."""
    if isinstance(source, (list, tuple)):
        return [Path(p) for p in source]
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(MASK_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"{path}: folder holds no .nrrd/.nii/.nii.gz masks")
        return files
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    return [path]


def case_name(path: str | os.PathLike) -> str:
    """Output folder name of an input file: its name without the mask suffix."""
    name = Path(path).name
    return name[: -len(mask_suffix(name))]


class ImplantGenerator:
    """Diffusion completion + SAP voxelization of one defective skull on an isotropic grid.

    Args:
        denoiser: ``model(x (B, 3, N), t (B,)) -> eps (B, 3, N)``.
        voxelizer: :class:`~scripts.networks.sap.SAPVoxelizer`.
        diffusion: :class:`~scripts.diffusion.process.ConditionalDiffusion`.
        num_condition, num_target: points given / generated (the denoiser's preset).
        sampler, steps: sampler name and network calls (``steps`` ignored by "ddpm").
        eta: DDIM's noise scale (0: deterministic DDIM; 1: fresh noise at every step); the other
            samplers ignore it (their noise is fixed by the method), and it is recorded as 0 for them.
        num_samples: ensemble members, sampled in one batch.
        seed: seeds surface sampling, condition draw and sampler noise.
        surface_points: Poisson-disk points drawn on the defective skull before the condition draw.
        margin: voxels of padding around the volume inside the periodic DPSR cube.
        max_distance_vox: implant voxels farther than this from the generated points are dropped.
        dilate: dilations of each complete-skull mask (the reference dilates once at 0.4 mm voxels;
            at coarser grids one voxel is a lot of bone, so the small preset uses 0).
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
        self.sampler, self.steps = sampler, (None if sampler == "ddpm" else steps)
        self.eta = float(eta) if sampler == "ddim" else 0.0
        self.num_samples, self.seed = int(num_samples), int(seed)
        self.surface_points = int(surface_points or 4 * num_condition)
        self.margin, self.max_distance_vox, self.dilate = int(margin), float(max_distance_vox), int(dilate)
        self.progress = progress

    def condition_points(self, defective: np.ndarray) -> np.ndarray:
        """Defective mask (X, Y, Z) -> the condition: num_condition surface points (Nc, 3), voxel coords."""
        surface = mask_to_surface_points(defective, self.surface_points, seed=self.seed)
        rng = np.random.default_rng(self.seed)
        return surface[rng.choice(len(surface), self.num_condition, replace=len(surface) < self.num_condition)]

    @torch.no_grad()
    def complete_points(self, defective: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Defective mask (X, Y, Z) -> completed clouds (K, N, 3) voxel coords and the generated
        part (K, num_target, 3); the condition is the first num_condition points of each cloud."""
        condition = torch.from_numpy(self.condition_points(defective)).to(self.device)
        center, scale = normalization_params(condition)
        cond = normalize_points(condition, center, scale).T.unsqueeze(0)  # (1, 3, Nc)
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        clouds = self.diffusion.sample_ensemble(
            self.denoiser, cond, self.num_samples, self.num_target, sampler=self.sampler, steps=self.steps,
            eta=self.eta, generator=generator, progress=self.progress,
        )
        clouds = denormalize_points(clouds.transpose(1, 2), center, scale).cpu().numpy()
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

    def __call__(self, defective: np.ndarray) -> dict:
        """Defective mask (X, Y, Z) on an isotropic cube grid -> dict with "completes" (K, X, Y, Z)
        bool, "implants" (K, X, Y, Z) bool, "implant_mean" bool, "probability"/"variance" float32
        (None for K = 1), "points" (K, N, 3) and "timings" (s)."""
        timings = {}
        start = time.perf_counter()
        clouds, generated = self.complete_points(defective)
        timings["diffusion"] = time.perf_counter() - start
        start = time.perf_counter()
        grids = self.indicators(clouds, defective.shape)
        timings["voxelization"] = time.perf_counter() - start
        start = time.perf_counter()
        result = postprocess_ensemble(grids.numpy(), defective, generated, self.dilate, self.max_distance_vox)
        timings["postprocessing"] = time.perf_counter() - start
        return {**result, "points": clouds, "timings": timings}


def _to_input_grid(volume: np.ndarray, cube: MetaTensor, iso: MetaTensor, img: MetaTensor, binary: bool) -> np.ndarray:
    """A model-grid volume (X', Y', Z') -> the input's exact grid (X, Y, Z): bool if binary else float32."""
    data = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None]
    out = crop_from_cube(MetaTensor(data, affine=cube.affine), iso)
    if iso is not img:
        out = to_original_grid(out, img, binary=binary)
    out = np.asarray(out[0])
    return out > 0.5 if binary else out.astype(np.float32)


def predict_case(
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    generator: ImplantGenerator,
    name: str | None = None,
    weights: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
    stl: bool = True,
    preview: bool = True,
    min_implant_ml: float = 1.0,
    input_type: str = "auto",
    bone_threshold_hu: float = DEFAULT_BONE_HU,
) -> dict:
    """Run one case and write ``<output_dir>/<name>/`` (default: the file name without suffix);
    returns the JSON summary.

    The input is a binary skull mask or a CT in HU (``input_type`` "mask", "ct" or "auto", see
    :func:`scripts.ct.load_skull`). Files: implant (input format), with num_samples > 1 also
    implant_member_<k>, implant_mean, implant_variance (float32); for a CT the derived skull_mask;
    implant.stl (mm, LPS), preview.png, summary.json. The folder is
    built in a temporary sibling and renamed into place, so a crash never leaves partial results;
    an existing result folder raises FileExistsError unless overwrite=True. An implant smaller
    than ``min_implant_ml`` raises ValueError ("no defect found"): the input has no defect to fill.
    """
    path = Path(path)
    name = name or case_name(path)
    final_dir = Path(output_dir) / name
    if final_dir.exists() and not overwrite:
        raise FileExistsError(f"{final_dir}: results exist already (pass overwrite=True / --overwrite true)")
    if final_dir.resolve() == path.parent.resolve():
        raise ValueError(f"{final_dir}: output folder is the input's folder; choose another output_dir")
    suffix = mask_suffix(path)
    start = time.perf_counter()
    img, input_kind = load_skull(path, input_type, bone_threshold_hu)
    iso = img if is_isotropic(img) else to_isotropic(img)
    cube = pad_to_cube(iso, max(iso.shape[1:]) + 2 * generator.margin)
    result = generator(np.asarray(cube[0]) > 0)

    def back(volume: np.ndarray, binary: bool = True) -> np.ndarray:
        return _to_input_grid(volume, cube, iso, img, binary)

    single = generator.num_samples == 1
    implant = back(result["implants"][0] if single else result["implant_mean"])
    defective = np.asarray(img[0]) > 0
    implant &= ~defective
    spacing = mask_spacing(img)
    voxels = require_implant(implant, math.ceil(min_implant_ml * 1000.0 / float(np.prod(spacing))), name=str(path))
    variance = None if single else back(result["variance"], binary=False)

    with atomic_folder(final_dir, overwrite) as tmp:
        save_mask(tmp / f"implant{suffix}", implant, reference=img)
        if input_kind == "ct":
            save_mask(tmp / f"skull_mask{suffix}", img, reference=img)
        if not single:
            for k, member in enumerate(result["implants"]):
                save_mask(tmp / f"implant_member_{k}{suffix}", back(member) & ~defective, reference=img)
            save_mask(tmp / f"implant_mean{suffix}", implant, reference=img)
            save_mask(tmp / f"implant_variance{suffix}", variance, reference=img, dtype=np.float32)
        if stl:
            save_stl(tmp / "implant.stl", implant, img.affine)
        if preview:
            save_preview(tmp / "preview.png", defective, implant, variance=variance, spacing=spacing, title=name)
        summary = {
            "case_id": name,
            "input": str(path.resolve()),
            "input_type": input_kind,
            "bone_threshold_hu": float(bone_threshold_hu) if input_kind == "ct" else None,
            "shape": list(img.shape[1:]),
            "spacing_mm": [float(s) for s in spacing],
            "resampled_to_isotropic": iso is not img,
            "implant_voxels": voxels,
            "implant_volume_ml": voxels * float(np.prod(spacing)) / 1000.0,
            "member_voxels": [int(m.sum()) for m in result["implants"]],
            "num_samples": generator.num_samples,
            "sampler": generator.sampler,
            "steps": generator.steps if generator.sampler != "ddpm" else generator.diffusion.num_timesteps,
            "eta": generator.eta,
            "network_calls": generator.diffusion.last_model_calls,
            "seed": generator.seed,
            "device": str(generator.device),
            "weights": {Path(w).name: file_sha256(w) for w in weights},
            "timings_s": {**{k: round(v, 3) for k, v in result["timings"].items()},
                          "total": round(time.perf_counter() - start, 3)},
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _failure_text(failure: dict) -> str:
    """"<file>: <reason>" of a failed case (a reason that names the file already is kept as it is)."""
    return failure["error"] if failure["input"] in failure["error"] else f"{failure['input']}: {failure['error']}"


def run_inference(
    inputs: str | os.PathLike | Sequence,
    output_dir: str | os.PathLike,
    generator: ImplantGenerator,
    weights: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
    stl: bool = True,
    preview: bool = True,
    input_type: str = "auto",
    bone_threshold_hu: float = DEFAULT_BONE_HU,
) -> dict:
    """Run :func:`predict_case` for every input (a file, a folder, a list of files, or datalist
    entries named by :func:`scripts.data.datalist.case_id`) and write ``<output_dir>/summary.json``.

    A failing case does not stop the batch: its file and reason are logged and listed. A case whose
    ``<output_dir>/<case>/summary.json`` exists is skipped (its summary is reused) unless ``overwrite``.
    Returns (and writes) ``{"cases": [case summaries, done or skipped], "skipped": [case ids],
    "failed": [{"input", "error"}]}``. Each failure is logged when it happens; after writing the file,
    :class:`~scripts.cli.BatchError` lists them all in one message when any case failed.
    """
    input_type = check_input_type(input_type)  # a typo fails here, not once per case
    bone_threshold_hu = check_bone_threshold(bone_threshold_hu)
    if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], dict):
        cases = [(Path(e["defective"]), case_id(e)) for e in inputs]
    else:
        cases = [(p, None) for p in list_inputs(inputs)]
    report = {"cases": [], "skipped": [], "failed": []}
    for path, cid in tqdm(cases, desc="cases", disable=not generator.progress or len(cases) < 2):
        try:
            name = cid or case_name(path)
            done = Path(output_dir) / name / "summary.json"
            if done.is_file() and not overwrite:
                report["cases"].append(json.loads(done.read_text()))
                report["skipped"].append(name)
                logger.info("%s: skipped, results exist in %s (--overwrite true redoes them)", name, done.parent)
                continue
            summary = predict_case(path, output_dir, generator, name, weights, overwrite, stl, preview,
                                   input_type=input_type, bone_threshold_hu=bone_threshold_hu)
        except Exception as err:  # one bad case must not stop the batch
            report["failed"].append({"input": str(path), "error": f"{type(err).__name__}: {err}"})
            logger.error("%s", _failure_text(report["failed"][-1]))
            logger.debug("traceback of the failure above", exc_info=True)
            continue
        report["cases"].append(summary)
        logger.info("%s: implant %.2f ml in %.1f s", name, summary["implant_volume_ml"], summary["timings_s"]["total"])
    index = Path(output_dir) / "summary.json"
    atomic_write(index, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)), overwrite=True)
    if report["failed"]:
        raise BatchError(f"{len(report['failed'])} of {len(cases)} cases failed (listed in {index}): "
                         + "; ".join(_failure_text(f) for f in report["failed"]))
    return report
