"""Volumetric 3D U-Net baseline (AutoImplant 2021 style): defective skull mask -> implant mask.

Training is pure MONAI wiring (``configs/train_unet.json``). Inference (``configs/inference_unet.json``)
uses the config's MONAI transforms for the resampling to the working grid and back (``Invertd``); this
module adds what the transforms do not: the input forms of the main job (file, folder, datalist), the
``<output_dir>/<case_id>/implant<suffix>`` layout that ``configs/evaluate.json`` scores, the implant
clean-up (subtract the defective skull, largest component) and a timed ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.inferers import Inferer, SimpleInferer

from scripts.evaluate import case_id as entry_case_id
from scripts.implant import largest_component, raw_implant
from scripts.cases import case_name, file_sha256, list_inputs
from scripts.io import atomic_write, load_mask, mask_spacing, mask_suffix, save_mask

__all__ = ["unet_cases", "predict_unet_case", "run_unet_inference"]

logger = logging.getLogger(__name__)


def unet_cases(inputs: str | os.PathLike | Sequence) -> list[tuple[Path, str]]:
    """A mask file, a folder of masks, a list of files, or a datalist (entries with "defective")
    -> [(defective mask path, case id)]; datalist entries are named by ``scripts.evaluate.case_id``."""
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(e, dict) for e in inputs):
        cases = []
        for entry in inputs:
            if "defective" not in entry:
                raise ValueError(f"input datalist entry {entry}: no 'defective' path")
            path = Path(entry["defective"])
            if not path.is_file():
                raise FileNotFoundError(f"input datalist entry {entry.get('case', '')}: file not found: {path}")
            cases.append((path, entry_case_id(entry)))
    else:
        cases = [(p, case_name(p)) for p in list_inputs(inputs)]
    if not cases:
        raise ValueError(f"input: no cases in {inputs!r}")
    names = [c for _, c in cases]
    duplicates = sorted({c for c in names if names.count(c) > 1})
    if duplicates:
        raise ValueError(f"input: several inputs map to the same case id(s) {duplicates}")
    return cases


def _output_path(output_dir: str | os.PathLike, path: Path, cid: str) -> Path:
    return Path(output_dir) / cid / f"implant{mask_suffix(path)}"


@torch.no_grad()
def predict_unet_case(
    path: str | os.PathLike,
    cid: str,
    output_dir: str | os.PathLike,
    network: torch.nn.Module,
    preprocessing: Callable,
    postprocessing: Callable,
    inferer: Inferer | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
) -> dict:
    """Predict one implant and write it to ``<output_dir>/<cid>/implant<suffix>`` on the input's grid.

    Args:
        path: defective skull mask (.nrrd / .nii / .nii.gz).
        cid: case id (output folder name).
        network: U-Net mapping (1, 1, *working_size) -> logits of the same shape, in eval mode.
        preprocessing: dict transform on {"image": (1, X, Y, Z) MetaTensor} -> working grid (invertible).
        postprocessing: dict transform on {"image", "pred": (1, *working_size) logits} -> "pred" binary
            on the input grid (sigmoid, ``Invertd``, threshold).
        inferer: MONAI inferer, default ``SimpleInferer``.
        overwrite: replace an existing implant instead of raising FileExistsError.
    Returns:
        The case summary (ids, geometry, implant size, timings in s).
    """
    path = Path(path)
    out = _output_path(output_dir, path, cid)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: implant exists already (pass overwrite=True / --overwrite true)")
    inferer = inferer or SimpleInferer()
    times = {"start": time.perf_counter()}
    img = load_mask(path)
    times["load"] = time.perf_counter()
    data = preprocessing({"image": img})
    data["pred"] = inferer(data["image"][None].to(device=device, dtype=torch.float32), network)[0].cpu()
    times["predict"] = time.perf_counter()
    pred = postprocessing(data)["pred"]
    if pred.shape != img.shape:
        raise RuntimeError(f"{path}: postprocessing returned shape {tuple(pred.shape)}, input {tuple(img.shape)}")
    implant = largest_component(raw_implant(pred, img))
    voxels = int(implant.sum())
    if voxels == 0:
        logger.warning("%s: empty implant predicted (writing an empty mask)", path)
    times["postprocess"] = time.perf_counter()
    save_mask(out, implant, reference=img, overwrite=overwrite)
    times["save"] = time.perf_counter()
    spacing = mask_spacing(img)
    steps = list(times)
    return {
        "case_id": cid,
        "input": str(path.resolve()),
        "output": str(out.resolve()),
        "shape": list(img.shape[1:]),
        "spacing_mm": [float(s) for s in spacing],
        "working_size": list(data["image"].shape[1:]),
        "implant_voxels": voxels,
        "implant_volume_ml": voxels * float(np.prod(spacing)) / 1000.0,
        "timings_s": {
            **{b: round(times[b] - times[a], 3) for a, b in zip(steps, steps[1:])},
            "total": round(times["save"] - times["start"], 3),
        },
    }


def run_unet_inference(
    inputs: str | os.PathLike | Sequence,
    output_dir: str | os.PathLike,
    network: torch.nn.Module,
    preprocessing: Callable,
    postprocessing: Callable,
    inferer: Inferer | None = None,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
) -> list[dict]:
    """Run :func:`predict_unet_case` on every input (see :func:`unet_cases`) and write the case
    summaries (plus method, device and the weights' SHA-256) as a list to ``<output_dir>/summary.json``.

    Existing implants are detected before any work is done: FileExistsError naming them unless overwrite.
    """
    cases = unet_cases(inputs)
    if not overwrite:
        existing = [str(p) for p in (_output_path(output_dir, path, cid) for path, cid in cases) if p.exists()]
        if existing:
            raise FileExistsError(f"implants exist already (pass overwrite=True / --overwrite true): {existing}")
    network = network.to(device).eval()
    run_info = {
        "method": "unet_baseline",
        "device": str(device),
        "weights": {Path(weights).name: file_sha256(weights)} if weights else {},
    }
    summaries = []
    for path, cid in cases:
        case = predict_unet_case(path, cid, output_dir, network, preprocessing, postprocessing, inferer, device, overwrite)
        summaries.append({**case, **run_info})
        logger.info("%s: implant %.2f ml in %.2f s", cid, case["implant_volume_ml"], case["timings_s"]["total"])
    atomic_write(Path(output_dir) / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summaries, indent=2)),
                 overwrite=True)
    return summaries
