"""Does the ensemble's uncertainty point at the implant's errors? A calibration benchmark (issue: uncertainty).

One ensemble of ``max(sizes)`` members per held-out case (configs/inference.json with ``--num_samples``); for each
ensemble size m in ``sizes`` its first m members give each voxel's probability of bone p (the share of members
with bone there) and the variance p (1 - p) that ``implant_variance`` holds. Scored on the voxels that any member
or the truth marks (every wrong voxel lies there):

- AUROC of the variance as a predictor of a wrong voxel (the majority vote xor the truth; MONAI's compute_roc_auc);
- the share of the wrong voxels that the variance flags (variance > 0);
- the expected calibration error of p against the truth (MONAI's CalibrationErrorMetric, 10 bins) and a
  reliability plot (MONAI's calibration_binning: mean p against the observed frequency of bone per bin);
- the expected wrong volume, the sum of min(p, 1 - p) voxel volumes (ml), against the true wrong volume across
  cases (Spearman correlation).

Per defect class and over all cases; ``calibration.json`` and ``reliability.png`` in ``output_dir``.

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
from scipy.stats import spearmanr

from scripts.data.datalist import case_id
from scripts.implant import expected_wrong_ml
from scripts.io import atomic_write, load_mask, mask_spacing
from scripts.metrics import dice
from tools.quality_study import GUARDS_OFF, _run, held_out_cases

NUM_BINS = 10


def score_case(members: np.ndarray, truth: np.ndarray, voxel_ml: float) -> dict:
    """Uncertainty scores of one ensemble: ``members`` bool (M, X, Y, Z) on the input grid, ``truth`` bool (X, Y, Z),
    ``voxel_ml`` one voxel's volume. Voxels outside every member and the truth are certain and right: left out."""
    region = members.any(axis=0) | truth
    p = members[:, region].mean(axis=0)  # (V,) probability of bone
    y = truth[region]
    vote = p > 0.5
    wrong = vote != y
    variance = p * (1.0 - p)
    auroc = float(compute_roc_auc(torch.from_numpy(variance), torch.from_numpy(wrong.astype(np.float32)))) \
        if 0 < wrong.sum() < wrong.size else float("nan")
    y_pred, y_true = (torch.from_numpy(a.astype(np.float32))[None, None] for a in (p, y))
    ece = float(CalibrationErrorMetric(num_bins=NUM_BINS)(y_pred, y_true).item())
    mean_p, mean_y, counts = (t[0, 0].numpy() for t in calibration_binning(y_pred, y_true, num_bins=NUM_BINS))
    return {"auroc": auroc, "flagged_share": float((variance[wrong] > 0).mean()) if wrong.any() else float("nan"),
            "ece": ece, "expected_wrong_ml": expected_wrong_ml(p, voxel_ml), "wrong_ml": float(wrong.sum() * voxel_ml),
            "dice_vote": dice(members.mean(axis=0) > 0.5, truth),
            "bins": {"mean_p": mean_p.tolist(), "frequency": mean_y.tolist(), "count": counts.tolist()}}


def summarize(rows: list[dict]) -> dict:
    """Means over cases (AUROC, flagged share, ECE, DSC of the vote) and the Spearman correlation of the expected
    and the true wrong volume across them."""
    out = {k: float(np.nanmean([r[k] for r in rows])) for k in ("auroc", "flagged_share", "ece", "dice_vote")}
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
    report {size: {"all": summary, "<defect>": summary, "cases": [...]}, "summary_expected_wrong_ml_spearman": r}."""
    sizes = sorted(int(s) for s in sizes)
    cases = held_out_cases(dataset_dir, num_cases, split_file=split_file, split=split)
    out = Path(output_dir)
    _run("inference.json", cases, out / "ensembles", stl=False, preview=False, progress=False, seed=seed,
         num_samples=sizes[-1], **{**GUARDS_OFF, **overrides})
    summaries = {s["case_id"]: s for s in json.loads((out / "ensembles" / "summary.json").read_text())["cases"]}
    per_size: dict = {m: [] for m in sizes}
    for case in cases:
        folder = out / "ensembles" / case_id(case)
        truth_img = load_mask(case["implant"])
        truth = np.asarray(truth_img[0]) > 0
        members = np.stack([np.asarray(load_mask(folder / f"implant_member_{k}.nrrd")[0]) > 0
                            for k in range(sizes[-1])])
        voxel_ml = float(np.prod(mask_spacing(truth_img))) / 1000.0
        for m in sizes:
            per_size[m].append({"case": case_id(case), "defect": case["defect"],
                                **score_case(members[:m], truth, voxel_ml)})
    # the number summary.json reports (the full ensemble's, on the model grid) against the true wrong volume
    rows = per_size[sizes[-1]]
    reported = [summaries[r["case"]]["expected_wrong_ml"] for r in rows]
    report = {"summary_expected_wrong_ml_spearman": float(spearmanr(reported, [r["wrong_ml"] for r in rows]).statistic)
              if len(rows) > 2 else float("nan")}
    for m, rows in per_size.items():
        classes = sorted({r["defect"] for r in rows})
        report[m] = {"all": summarize(rows), **{c: summarize([r for r in rows if r["defect"] == c]) for c in classes},
                     "cases": rows}
    plot(per_size[sizes[-1] if 5 not in per_size else 5], out / "reliability.png")
    atomic_write(out / "calibration.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)),
                 overwrite=True)
    for m in sizes:
        print(m, {k: round(v, 3) for k, v in report[m]["all"].items()})
    return report


if __name__ == "__main__":
    fire.Fire(main)
