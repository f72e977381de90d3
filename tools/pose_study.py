"""Pose and size study: the same synthetic skulls upright, rotated, scaled and stretched (issue: canonical
head frame). Nothing here is tuned on: the skulls come from a generator seed that no training or tuning
uses (default 2027).

Each skull x defect class is written upright (128^3, 1.6 mm, as generated; ``--size 256``: 0.8 mm) and as three copies in a field of
view of the same size: rotated by a random rotation of up to ``max_deg`` about each axis, scaled by a random
factor in [0.8, 1.15], and stretched by +-10 % along a random axis (the true implant goes through the same
resampling). Every copy runs configs/inference.json with the no-defect guards on (a refused case is
counted, and scored as an empty implant) with the default priors and with the diffusion sample alone.
Two controls say how much of a copy's loss is the resampling that made it rather than its pose: the
*floor* (the upright implant moved like the copy, against the copy's truth) and a ``roundtrip`` copy (the input
rotated and turned back, two resamplings in the upright pose, against the untouched truth).

    python -m tools.pose_study run --output_dir runs/pose --num_skulls 2 --seed 2027
    python -m tools.pose_study run --output_dir runs/pose_mirror --settings alone --preset small_mirror \
        --denoiser_weights <exported EMA weights>   # another denoiser, the diffusion sample alone
    python -m tools.pose_study calibrate --num_skulls 10      # the frame constants, on training skulls
    python -m tools.pose_study calibrate --head_scale "[0.8,1.05]" --head_stretch 0.1   # on the widened ones
    python -m tools.pose_study planes --split train           # mid-sagittal plane errors, on training skulls

``run`` prints markdown tables (means per variant and setting, the paired differences to upright with their
standard error, and DSC case by case) and writes ``<output_dir>/pose.json`` (``report`` prints its tables again);
finished cases are read back, so an interrupted study resumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import fire
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from scipy.spatial.transform import Rotation

from scripts.cases import case_datalist, predict_case
from scripts.data.synthetic import SKULLBREAK_DEFECTS, skullbreak_case
from scripts.frame import REFERENCE_SIZE_MM, SkullSurface, _fit_template, estimate_frame, to_canonical
from scripts.io import load_mask, save_mask
from scripts.metrics import boundary_dice, dice, hd95

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"default": {}, "alone": {"mirror_prior": False, "shell_prior": False}}
# "roundtrip": the input rotated like a rotated copy and back again (two resamplings, the upright pose), scored
# against the untouched truth: what the copies' resampling of the input alone costs
VARIANTS = ("upright", "rotated", "scaled", "stretched", "roundtrip")


def moved(img: MetaTensor, linear: np.ndarray) -> np.ndarray:
    """The head of a cube mask ``img`` (1, S, S, S) moved by ``linear`` (3, 3: a rotation, a scaling) about
    the volume's centre, in the same field of view -> bool (S, S, S)."""
    affine, side = img.affine.numpy(), img.shape[1]
    centre = affine[:3, :3] @ np.full(3, (side - 1) / 2.0) + affine[:3, 3]
    inverse = np.linalg.inv(linear)  # the grid that shows the head moved by linear is moved by its inverse
    grid = np.eye(4)
    grid[:3, :3] = inverse @ affine[:3, :3]
    grid[:3, 3] = inverse @ (affine[:3, 3] - centre) + centre
    return np.asarray(to_canonical(img, grid, side)[0]) > 0


def variant_linear(kind: str, rng: np.random.Generator, max_deg: float) -> tuple[np.ndarray, dict]:
    """How :data:`VARIANTS` ``kind`` moves the head (3, 3) and what was drawn for it: a random rotation (the
    inverse of the x-y-z Euler angles drawn, up to ``max_deg``; "roundtrip" also draws one), scale or stretch."""
    if kind == "upright":
        return np.eye(3), {}
    if kind in ("rotated", "roundtrip"):
        angles = rng.uniform(-max_deg, max_deg, 3)
        return Rotation.from_euler("xyz", angles, degrees=True).as_matrix().T, {"drawn_rotation_deg": angles.round(2).tolist()}
    if kind == "scaled":
        factor = rng.uniform(0.8, 1.15)
        return np.eye(3) * factor, {"scale": round(float(factor), 4)}
    axis, factor = int(rng.integers(3)), float(rng.choice([0.9, 1.1]))
    linear = np.eye(3)
    linear[axis, axis] = factor
    return linear, {"stretch_axis": axis, "stretch": factor}


def _copy(mask: np.ndarray, affine: np.ndarray, kind: str, linear: np.ndarray, truth: bool) -> np.ndarray:
    """The :data:`VARIANTS` ``kind`` copy of a bool mask (S, S, S) in its original field of view -> uint8."""
    if kind == "upright" or (kind == "roundtrip" and truth):
        return mask.astype(np.uint8)
    img = MetaTensor(torch.from_numpy(mask[None].astype(np.uint8)), affine=torch.as_tensor(affine))
    head = moved(img, linear)
    if kind == "roundtrip":
        head = moved(MetaTensor(torch.from_numpy(head[None].astype(np.uint8)), affine=img.affine), linear.T)
    return head.astype(np.uint8)


def write_cases(folder: Path, num_skulls: int, seed: int, max_deg: float, size: int = 128) -> list[dict]:
    """Each skull x defect x variant as ``<case>_<variant>.nii.gz`` with its truth ``..._truth.nii.gz``."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for skull_id in range(num_skulls):
        case = skullbreak_case(skull_id, size=size, seed=seed)
        for defect in SKULLBREAK_DEFECTS:
            defective, implant = case.defect(defect)
            rng = np.random.default_rng([seed, skull_id, SKULLBREAK_DEFECTS.index(defect)])
            for kind in VARIANTS:
                name = f"{seed}_{skull_id:03d}_{defect}_{kind}"
                linear, drawn = variant_linear(kind, rng, max_deg)
                paths = {"input": folder / f"{name}.nii.gz", "truth": folder / f"{name}_truth.nii.gz"}
                if not paths["truth"].exists():
                    for key, mask in (("input", defective), ("truth", implant)):
                        save_mask(paths[key], _copy(mask, case.affine, kind, linear, key == "truth"), case.affine)
                final = np.eye(3) if kind == "roundtrip" else linear  # where the head ends up
                cases.append({"name": name, "skull": skull_id, "defect": defect, "variant": kind, **drawn,
                              "linear": final.tolist(), **{k: str(v) for k, v in paths.items()}})
    return cases


def score(implant_path: Path | None, case: dict, move_upright: bool = False) -> dict:
    """DSC, boundary DSC and HD95 (mm) of an implant file against the case's truth (None: a refused case).
    ``move_upright``: ``implant_path`` is the upright copy's implant, moved like this copy first (what a pipeline
    that gave every copy exactly the upright answer would score: the copy's own resampling loss)."""
    truth, defective = load_mask(case["truth"]), load_mask(case["input"])
    spacing = np.abs(np.diag(np.asarray(truth.affine)[:3, :3]))
    gt = np.asarray(truth[0]) > 0
    if implant_path is None:
        pred = np.zeros_like(gt)
    elif move_upright:
        pred = moved(load_mask(implant_path), np.asarray(case["linear"]))
    else:
        pred = np.asarray(load_mask(implant_path)[0]) > 0
    return {"dsc": dice(pred, gt), "bdsc": boundary_dice(pred, gt, np.asarray(defective[0]) > 0, spacing),
            "hd95": hd95(pred, gt, spacing) if pred.any() else float("nan")}


def run(output_dir: str = "runs/pose", num_skulls: int = 2, seed: int = 2027, max_deg: float = 25.0, steps: int = 10,
        settings: tuple = tuple(SETTINGS), size: int = 128, **config):
    """Runs the study (see the module docstring) for ``settings`` (names in SETTINGS) on ``size``^3 skulls (the
    204.8 mm field of view: 1.6 mm voxels at 128, 0.8 mm at 256), with ``config`` overriding
    configs/inference.json for all of them (e.g. ``preset``, ``denoiser_weights``): prints the table, writes
    ``<output_dir>/pose.json``."""
    out = Path(output_dir)
    cases = write_cases(out / "cases", num_skulls, seed, max_deg, size)
    rows = []
    for setting in settings.split(",") if isinstance(settings, str) else settings:
        overrides = {**config, **SETTINGS[setting]}
        parser = ConfigParser()
        parser.read_config(str(ROOT / "configs" / "inference.json"))
        parser.update({"bundle_root": str(ROOT), "progress": False, "output_dir": str(out / setting), "stl": False,
                       "preview": False, "steps": steps, **overrides})
        preprocessing, postprocessing, inferer = (parser.get_parsed_content(k) for k in
                                                  ("preprocessing", "postprocessing", "inferer"))
        for case in cases:
            folder = out / setting / case["name"]
            if (folder / "summary.json").exists():
                summary = json.loads((folder / "summary.json").read_text())
            else:
                try:
                    summary = predict_case(case_datalist([case["input"]])[0], preprocessing, inferer, postprocessing)
                except ValueError as err:  # the no-defect guard
                    summary = {"refused": str(err)}
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / "summary.json").write_text(json.dumps(summary))
            implant = None if "refused" in summary else folder / "implant.nii.gz"
            rows.append({**case, "setting": setting, "refused": "refused" in summary, **score(implant, case),
                         **{k: summary.get(k) for k in ("rotation_deg", "frame", "head_scale", "head_proportions",
                                                        "frame_residual_mm")},
                         "frame_s": summary.get("timings_s", {}).get("frame")})
            print(f"{setting} {case['name']}: DSC {rows[-1]['dsc']:.3f}", flush=True)
        for row in rows:  # the resampling floor: the upright implant moved like each copy
            upright = out / setting / f"{row['name'].rsplit('_', 1)[0]}_upright" / "implant.nii.gz"
            if row["setting"] == setting and row["variant"] != "upright" and upright.exists():
                row["floor"] = score(upright, row, move_upright=True)
    report = {"seed": seed, "num_skulls": num_skulls, "max_deg": max_deg, "rows": rows}
    (out / "pose.json").write_text(json.dumps(report, indent=1, default=float))
    print(tables(rows))


def tables(rows: list[dict]) -> str:
    """:func:`markdown`, then :func:`case_table` for each setting."""
    return "\n".join([markdown(rows)] + [f"\nDSC case by case, {setting}:\n{case_table(rows, setting)}"
                                         for setting in dict.fromkeys(r["setting"] for r in rows)])


def report(output_dir: str = "runs/pose"):
    """The tables of a finished study, from ``<output_dir>/pose.json``."""
    print(tables(json.loads((Path(output_dir) / "pose.json").read_text())["rows"]))


def markdown(rows: list[dict]) -> str:
    """Mean DSC / bDSC / HD95 per setting and variant, the paired differences to upright, and those of the
    resampling floor (the upright implant moved like the copy)."""
    lines = ["| setting | variant | DSC | bDSC | HD95 mm | dDSC vs upright | dbDSC | dHD95 | SE of dDSC | refused | "
             "floor: dDSC / dbDSC / dHD95 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        upright = {(r["skull"], r["defect"]): r for r in rows if r["setting"] == setting and r["variant"] == "upright"}
        for kind in VARIANTS:
            sel = [r for r in rows if r["setting"] == setting and r["variant"] == kind]
            if not sel:
                continue
            diff = lambda k: np.array([r[k] - upright[(r["skull"], r["defect"])][k] for r in sel])  # noqa: E731
            mean = lambda k: np.nanmean([r[k] for r in sel])  # noqa: E731
            floor = "-"
            if all("floor" in r for r in sel):
                lost = {k: np.nanmean([r["floor"][k] - upright[(r["skull"], r["defect"])][k] for r in sel])
                        for k in ("dsc", "bdsc", "hd95")}
                floor = f"{lost['dsc']:+.3f} / {lost['bdsc']:+.3f} / {lost['hd95']:+.2f}"
            lines.append(f"| {setting} | {kind} | {mean('dsc'):.3f} | {mean('bdsc'):.3f} | {mean('hd95'):.2f} | "
                         f"{diff('dsc').mean():+.3f} | {diff('bdsc').mean():+.3f} | {np.nanmean(diff('hd95')):+.2f} | "
                         f"{diff('dsc').std(ddof=1) / np.sqrt(len(sel)) if len(sel) > 1 else float('nan'):.3f} | "
                         f"{sum(r['refused'] for r in sel)}/{len(sel)} | {floor} |")
    return "\n".join(lines)


def case_table(rows: list[dict], setting: str) -> str:
    """DSC of every skull x defect class of ``setting`` (rows) in each variant (columns)."""
    kinds = [k for k in VARIANTS if any(r["setting"] == setting and r["variant"] == k for r in rows)]
    dsc = {(r["skull"], r["defect"], r["variant"]): r["dsc"] for r in rows if r["setting"] == setting}
    lines = ["| skull, defect | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for skull, defect in sorted({(r["skull"], r["defect"]) for r in rows if r["setting"] == setting}):
        lines.append(f"| {skull}, {defect} | " + " | ".join(f"{dsc.get((skull, defect, k), float('nan')):.3f}"
                                                           for k in kinds) + " |")
    return "\n".join(lines)


def _mirrored(points: np.ndarray, frame) -> np.ndarray:
    """World points (N, 3) mirrored across the frame's mid-sagittal plane (through its centre)."""
    local = (points - frame.centre) @ frame.rotation
    local[:, 0] = -local[:, 0]
    return local @ frame.rotation.T + frame.centre


def calibrate(num_skulls: int = 10, seed: int = 0, size: int = 128, head_scale: tuple[float, float] | None = None,
              head_stretch: float = 0.0):
    """The frame constants on upright training skulls (generator seed 0; ``head_scale`` / ``head_stretch`` as
    the widened training skulls were made): the pitch of the estimated long axis against the generator's own
    skull frame, the size measure (REFERENCE_SIZE_MM) and the range of the proportions."""
    pitches, sizes, times, fitness, proportions = [], [], [], [], []
    for skull_id in range(num_skulls):
        case = skullbreak_case(skull_id, size=size, seed=seed, head_scale=None if head_scale is None else tuple(head_scale),
                               head_stretch=head_stretch)
        for defect in SKULLBREAK_DEFECTS:
            defective, _ = case.defect(defect)
            start = time.perf_counter()
            frame = estimate_frame(defective, case.affine)
            times.append(time.perf_counter() - start)
            points = SkullSurface(defective, case.affine).points
            points = np.concatenate([points, _mirrored(points, frame)])
            fitness.append(_fit_template(points, frame.rotation, frame.centre, frame.size_mm)[1])
            proportions.append(frame.proportions)
            relative = case.skull.rotation.T @ frame.rotation  # estimated axes in the skull's own frame
            pitches.append(float(np.degrees(np.arctan2(relative[2, 1], relative[1, 1]))))
            sizes.append(frame.size_mm)
    print(f"pitch of the long axis against the skull frame: median {np.median(pitches):+.2f} deg "
          f"(IQR {np.percentile(pitches, 25):+.2f}..{np.percentile(pitches, 75):+.2f}); size: median "
          f"{np.median(sizes):.1f} mm (IQR {np.percentile(sizes, 25):.1f}..{np.percentile(sizes, 75):.1f}), "
          f"REFERENCE_SIZE_MM now {REFERENCE_SIZE_MM}; template coverage min {min(fitness):.3f}; estimate "
          f"{np.median(times):.2f} s median; proportions (width, length, height) 1st-99th percentile "
          f"{np.percentile(proportions, 1, axis=0).round(3)} - {np.percentile(proportions, 99, axis=0).round(3)}")


def planes(split: str = "train", split_file: str = "configs/splits/synthetic_wide.json", seed: int = 0,
           max_deg: float = 25.0, head_scale: tuple[float, float] = (0.8, 1.05), head_stretch: float = 0.1,
           output: str = "runs/planes.json"):
    """The estimated head frame against the generator's skull frame for every
    skull of ``split`` x defect class, upright and turned by a random rotation of up to ``max_deg`` per axis
    (the header's affine is turned, which turns the head in world space without resampling): the angle between
    the mid-sagittal planes' normals and the angle of the whole rotation between the frames (degrees; what a
    training augmentation has to cover). Prints their percentiles and every plane off by more than 5 degrees;
    writes the rows to ``output``."""
    ids = json.loads((ROOT / split_file).read_text())[split]
    rows = []
    for skull_id in ids:
        case = skullbreak_case(int(skull_id), size=128, seed=seed, head_scale=tuple(head_scale), head_stretch=head_stretch)
        for defect in SKULLBREAK_DEFECTS:
            defective, _ = case.defect(defect)
            rng = np.random.default_rng([seed, int(skull_id), SKULLBREAK_DEFECTS.index(defect)])
            for kind in ("upright", "rotated"):
                turn = np.eye(4)
                if kind == "rotated":
                    turn[:3, :3] = Rotation.from_euler("xyz", rng.uniform(-max_deg, max_deg, 3), degrees=True).as_matrix()
                frame = estimate_frame(defective, turn @ case.affine)
                truth = turn[:3, :3] @ case.skull.rotation
                angle = float(np.degrees(np.arccos(min(1.0, abs(frame.rotation[:, 0] @ truth[:, 0])))))
                rotation = Rotation.from_matrix(truth.T @ frame.rotation).magnitude()
                rows.append({"skull": skull_id, "defect": defect, "variant": kind, "angle_deg": round(angle, 2),
                             "rotation_error_deg": round(float(np.degrees(rotation)), 2),
                             "residual_mm": round(frame.residual_mm, 3), "frame": frame.source})
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(rows, indent=1))
    for kind in ("upright", "rotated"):
        for key, what in (("angle_deg", "plane normal"), ("rotation_error_deg", "whole rotation")):
            angles = np.array([r[key] for r in rows if r["variant"] == kind])
            print(f"{kind}, {what}: {len(angles)} cases, error median {np.median(angles):.2f} deg, 95th percentile "
                  f"{np.percentile(angles, 95):.2f}, 99th {np.percentile(angles, 99):.2f}, max {angles.max():.2f}, "
                  f"over 5 deg: {(angles > 5).sum()}")
    for r in rows:
        if r["angle_deg"] > 5:
            print(r)


if __name__ == "__main__":
    fire.Fire({"run": run, "report": report, "calibrate": calibrate, "planes": planes})
