"""Does the ensemble's uncertainty point at the implant's errors? A calibration benchmark (issue: uncertainty).

For each ensemble size m in ``sizes``, one ensemble of m members per held-out case (configs/inference.json with
``--num_samples m``): its ``implant_probability`` p (each voxel's probability of bone: the share of members with
bone there, or with ``--priors#surface_sd`` the members' mean probability) and ``implant`` (the ensemble's
implant, "the vote": their majority vote, or with ``surface_sd`` p >= ``scripts.generator.SOFT_VOTE``),
scored (AUROC, ECE) on the voxels within ``REGION_VOXELS`` of the vote, a region that does not depend on the
truth:

- AUROC of the variance p (1 - p) (``implant_variance``) as a predictor of a wrong voxel (the vote xor the truth;
  MONAI's compute_roc_auc);
- the share of the wrong voxels that the variance flags (p (1 - p) >= ``scripts.outputs.UNSURE_VARIANCE``, the
  voxels the preview colours: 0.05 < p < 0.95);
- the expected calibration error of p against the truth (MONAI's CalibrationErrorMetric, 10 bins) and a
  reliability plot (MONAI's calibration_binning: mean p against the observed frequency of bone per bin);
- the expected wrong volume of the vote (1 - p inside it, p outside; ml), against the true wrong volume across
  cases (Spearman correlation), and the same for the ``expected_wrong_ml`` that summary.json reports;
- the preview's colour, the expected wrong thickness along each line of sight, against the true wrong thickness
  there (Spearman over the pixels it colours, the mean of its three views).

Per defect class and over all cases; ``calibration.json`` and ``reliability.png`` (the 5-member ensembles, or
the largest) in ``output_dir``.

    python -m tools.calibration --dataset_dir data/synth128_wide --split_file configs/splits/synthetic_wide.json \\
        --split validation --num_cases 15 --output_dir runs/calibration
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
import numpy as np
import torch
from matplotlib.figure import Figure
from monai.metrics import CalibrationErrorMetric, calibration_binning, compute_roc_auc
from scipy import ndimage
from scipy.stats import spearmanr

from scripts.data.datalist import case_id
from scripts.implant import expected_wrong_ml
from scripts.io import atomic_write, load_mask, load_volume, mask_spacing
from scripts.metrics import dice
from scripts.outputs import unsure, wrong_thickness
from tools.quality_study import GUARDS_OFF, _run, held_out_cases

NUM_BINS = 10
REGION_VOXELS = 3  # AUROC and ECE region: the vote dilated by this many voxels (the ensembles' errors lie within 1)


def preview_spearman(probability: np.ndarray, vote: np.ndarray, truth: np.ndarray) -> float:
    """Does the preview point at the errors? Per view (axis), the Spearman correlation of each line of sight's
    expected wrong thickness (``wrong_thickness``, what ``save_preview`` colours) with its true wrong
    thickness, over the pixels the preview colours; the mean of the three views. Arrays (X, Y, Z)."""
    overlay = vote | unsure(probability)
    wrong = vote != truth
    rhos = [spearmanr(wrong_thickness(probability, vote, axis)[hit], wrong.sum(axis)[hit]).statistic
            for axis in range(3) if (hit := overlay.any(axis)).sum() > 2]
    return float(np.nanmean(rhos)) if rhos else float("nan")


def score_case(probability: np.ndarray, vote: np.ndarray, truth: np.ndarray, voxel_ml: float) -> dict:
    """Uncertainty scores of one ensemble: each voxel's ``probability`` of bone (X, Y, Z), the ensemble's
    implant ``vote`` and the ``truth``, bool (X, Y, Z), on the input grid; ``voxel_ml`` one voxel's volume.

    AUROC, ECE and the reliability bins are taken over the voxels within ``REGION_VOXELS`` of the vote, a region
    chosen without the truth (one chosen with it, such as the vote or the truth, holds low-p voxels only where
    they are bone, which no p can calibrate); the flagged share and the wrong volume count every wrong voxel."""
    region = ndimage.binary_dilation(vote, iterations=REGION_VOXELS)
    wrong_all = vote != truth
    p, y = probability[region].astype(np.float64), truth[region]
    wrong = vote[region] != y
    variance = p * (1.0 - p)
    auroc = float(compute_roc_auc(torch.from_numpy(variance), torch.from_numpy(wrong.astype(np.float32)))) \
        if 0 < wrong.sum() < wrong.size else float("nan")
    y_pred, y_true = (torch.from_numpy(a.astype(np.float32))[None, None] for a in (p, y))
    ece = float(CalibrationErrorMetric(num_bins=NUM_BINS)(y_pred, y_true).item())
    mean_p, mean_y, counts = (t[0, 0].numpy() for t in calibration_binning(y_pred, y_true, num_bins=NUM_BINS))
    flagged = unsure(probability[wrong_all].astype(np.float64))
    return {"auroc": auroc, "flagged_share": float(flagged.mean()) if wrong_all.any() else float("nan"),
            "ece": ece, "expected_wrong_ml": expected_wrong_ml(probability, vote, voxel_ml),
            "wrong_ml": float(wrong_all.sum() * voxel_ml),
            "dice_vote": dice(vote, truth), "preview_spearman": preview_spearman(probability, vote, truth),
            "bins": {"mean_p": mean_p.tolist(), "frequency": mean_y.tolist(), "count": counts.tolist()}}


def summarize(rows: list[dict]) -> dict:
    """Means over cases (AUROC, flagged share, ECE, DSC of the vote, the preview's Spearman) and the Spearman
    correlation of the expected and the true wrong volume across them."""
    keys = ("auroc", "flagged_share", "ece", "dice_vote", "preview_spearman")
    out = {k: float(np.nanmean([r[k] for r in rows])) for k in keys}
    out["cases"] = len(rows)
    expected, true = [r["expected_wrong_ml"] for r in rows], [r["wrong_ml"] for r in rows]
    out["spearman_wrong_ml"] = float(spearmanr(expected, true).statistic) if len(rows) > 2 else float("nan")
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Reliability diagram: the pooled bins of every case (mean p against the observed frequency of bone)."""
    counts = np.sum([r["bins"]["count"] for r in rows], axis=0)
    weighted = lambda key: np.nansum([np.nan_to_num(r["bins"][key]) * np.asarray(r["bins"]["count"])  # noqa: E731
                                      for r in rows], axis=0) / np.maximum(counts, 1)
    fig = Figure(figsize=(4.5, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    used = counts > 0
    ax.plot(weighted("mean_p")[used], weighted("frequency")[used], marker="o", label="ensemble")
    ax.set_xlabel("predicted probability of bone")
    ax.set_ylabel("observed frequency of bone")
    ax.legend(loc="upper left")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), overwrite=True)


def main(dataset_dir: str, output_dir: str = "runs/calibration", num_cases: int = 15, sizes: tuple = (3, 5, 10),
         split_file: str | None = None, split: str = "validation", seed: int = 0, **overrides) -> dict:
    """Run the ensembles (``overrides`` go to configs/inference.json), score every size, write and return the
    report {size: {"all": summary, "<defect>": summary, "cases": [...], "summary_expected_wrong_ml_spearman": r}}."""
    sizes = sorted(int(s) for s in sizes)
    cases = held_out_cases(dataset_dir, num_cases, split_file=split_file, split=split)
    out, report = Path(output_dir), {}
    truths = {case_id(case): load_mask(case["implant"]) for case in cases}
    for m in sizes:
        folder = out / f"ensembles_{m}"
        _run("inference.json", cases, folder, stl=False, preview=False, progress=False, seed=seed, num_samples=m,
             **{**GUARDS_OFF, **overrides})
        summaries = {s["case_id"]: s for s in json.loads((folder / "summary.json").read_text())["cases"]}
        rows = []
        for case in cases:
            truth_img = truths[case_id(case)]
            result = folder / case_id(case)
            probability = np.asarray(load_volume(result / "implant_probability.nrrd")[0])
            vote = np.asarray(load_mask(result / "implant.nrrd")[0]) > 0
            voxel_ml = float(np.prod(mask_spacing(truth_img))) / 1000.0
            rows.append({"case": case_id(case), "defect": case["defect"],
                         **score_case(probability, vote, np.asarray(truth_img[0]) > 0, voxel_ml)})
        # the number summary.json reports (on the model grid) against the true wrong volume
        reported = [summaries[r["case"]]["expected_wrong_ml"] for r in rows]
        classes = sorted({r["defect"] for r in rows})
        report[m] = {"all": summarize(rows), **{c: summarize([r for r in rows if r["defect"] == c]) for c in classes},
                     "summary_expected_wrong_ml_spearman": float(spearmanr(reported, [r["wrong_ml"] for r in rows])
                                                                 .statistic) if len(rows) > 2 else float("nan"),
                     "cases": rows}
    plot(report[5 if 5 in report else sizes[-1]]["cases"], out / "reliability.png")
    atomic_write(out / "calibration.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)),
                 overwrite=True)
    for m in sizes:
        print(m, {k: round(v, 3) for k, v in report[m]["all"].items()},
              round(report[m]["summary_expected_wrong_ml_spearman"], 3))
    return report


if __name__ == "__main__":
    fire.Fire(main)
