"""Cost of one full-size head CT (and its mask) through the default job, on this machine's CPUs.

``make`` writes the benchmark cases once: a synthetic skull (generator seed 0, skull 2, ``random_1`` defect) on a
512 x 512 x 450 grid of 0.45 mm, as a CT in Hounsfield units (int16, NRRD), as a binary mask (uint8) and as
2.5 mm slices, with the true implant. ``run`` times the default inference job on each in a fresh process
(``/usr/bin/time``: wall and peak RSS), ``batch`` times ten copies in one job, and the implants are scored
against the reference implant written by ``--reference`` runs (DSC; the goal is within 0.005).

    python -m tools.benchmark_ct make --out data/ct512
    python -m tools.benchmark_ct run --cases data/ct512 --out runs/ct512
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import fire
import numpy as np

SHAPE, SPACING_MM, THICK_MM = (512, 512, 450), 0.45, 2.5
CASE, SEED, DEFECT = 2, 0, "random_1"


def make(out: str = "data/ct512", shape: tuple = SHAPE, spacing: float = SPACING_MM) -> str:
    """Write ``ct.nrrd`` (int16 HU), ``mask.nrrd`` (uint8), ``ct_thick.nrrd`` (2.5 mm slices along axis 2) and
    ``implant.nrrd`` (the truth) into ``out``."""
    from scripts.data.synthetic import FOV_MM, SyntheticCase, sample_skull, synthetic_ct
    from scripts.io import save_mask

    shape, out = tuple(int(s) for s in shape), Path(out)
    skull = sample_skull(np.random.default_rng([SEED, CASE]))
    skull = replace(skull, centre=skull.centre + (np.asarray(shape) * spacing - FOV_MM) / 2.0)  # centred in the FOV
    case = SyntheticCase(CASE, SEED, skull, skull.mask(shape, (spacing,) * 3), (spacing,) * 3)
    defective, implant = case.defect(DEFECT)
    affine = case.affine
    save_mask(out / "mask.nrrd", defective, affine, overwrite=True)
    save_mask(out / "implant.nrrd", implant, affine, overwrite=True)
    ct = synthetic_ct(defective, seed=SEED)
    save_mask(out / "ct.nrrd", ct, affine, dtype=np.int16, overwrite=True)
    step = THICK_MM / spacing  # thick slices: the mean of the thin slices each covers
    edges = np.round(np.arange(0, shape[2] + 1e-6, step)).astype(int)
    thick = np.stack([ct[:, :, a:b].mean(axis=2) for a, b in zip(edges[:-1], edges[1:]) if b > a], axis=2)
    thick_affine = affine.copy()
    thick_affine[2, 2] = THICK_MM
    thick_affine[2, 3] = (step - 1) / 2 * spacing
    save_mask(out / "ct_thick.nrrd", np.round(thick), thick_affine, dtype=np.int16, overwrite=True)
    return str(out)


def _job(inputs: list[str], output_dir: Path, threads: int, overrides: dict) -> dict:
    """The default inference job on ``inputs`` in a fresh process: {"wall_s", "peak_rss_gib", "summaries"}."""
    if output_dir.exists():
        shutil.rmtree(output_dir)
    args = ["--input", json.dumps(inputs) if len(inputs) > 1 else inputs[0], "--output_dir", str(output_dir)]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = ["/usr/bin/time", "-f", "TIME %e %M", sys.executable, "-m", "monai.bundle", "run", "--config_file",
               "configs/inference.json", *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    found = re.search(r"TIME ([\d.]+) (\d+)", done.stderr)
    if done.returncode or not found:
        raise RuntimeError(f"inference failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summaries = [json.loads(p.read_text()) for p in sorted(output_dir.glob("*/summary.json"))]
    return {"wall_s": float(found.group(1)), "peak_rss_gib": round(int(found.group(2)) / 2**20, 2),
            "summaries": summaries}


def _dice(a: Path, b: Path) -> float:
    from scripts.io import load_mask
    from scripts.metrics import dice

    return round(float(dice(np.asarray(load_mask(a)[0]) > 0, np.asarray(load_mask(b)[0]) > 0)), 4)


def run(cases: str = "data/ct512", out: str = "runs/ct512", threads: int = 2, batch: int = 10,
        reference: str | None = None, **overrides) -> dict:
    """Time the default job on the CT, the mask and the thick-slice CT of ``make``, one case per process, then
    ``batch`` copies of the CT in one job; score each implant against the truth and, where ``reference`` (an
    earlier ``out``) holds one, against that run's implant. Writes ``out``/report.json and returns it."""
    cases, out = Path(cases), Path(out)
    report = {"threads": threads, "rows": []}
    for name in ("ct", "mask", "ct_thick"):
        job = _job([str(cases / f"{name}.nrrd")], out / name, threads, overrides)
        implant = out / name / name / "implant.nrrd"
        row = {"input": name, "wall_s": job["wall_s"], "peak_rss_gib": job["peak_rss_gib"],
               "timings_s": job["summaries"][0].get("timings_s"), "dice_truth": None, "dice_reference": None}
        if name != "ct_thick":
            row["dice_truth"] = _dice(implant, cases / "implant.nrrd")
        if reference and (Path(reference) / name / name / "implant.nrrd").is_file():
            row["dice_reference"] = _dice(implant, Path(reference) / name / name / "implant.nrrd")
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    if batch:
        folder = out / "batch_inputs"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for k in range(batch):
            os.symlink((cases / "ct.nrrd").resolve(), folder / f"ct_{k:02d}.nrrd")
        job = _job([str(folder)], out / "batch", threads, overrides)
        report["batch"] = {"cases": batch, "wall_s": job["wall_s"], "peak_rss_gib": job["peak_rss_gib"],
                           "case_peaks_gib": [s.get("peak_rss_gib") for s in job["summaries"]],
                           "case_wall_s": [s["timings_s"]["total"] for s in job["summaries"]]}
        print(json.dumps(report["batch"]), flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    fire.Fire({"make": make, "run": run})
