"""Evaluation job: prediction pairing, Ignite evaluator with the AutoImplant + MONAI metrics, report files."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.data.datalist import skullbreak_datalist
from scripts.evaluate import PixdimHausdorffDistanceMetric, case_id, evaluate_predictions, prediction_datalist
from scripts.io import MaskError, save_mask
from scripts.metrics import boundary_dice, dice, hd95, monai_reference_metrics

ROOT = Path(__file__).resolve().parents[1]
SIZE = 28
SPACING = (0.8, 0.8, 1.2)
AFFINE = np.diag([*SPACING, 1.0])
BAND_MM = 4.5  # narrower than 10 mm so the tiny volume has voxels outside; no voxel distance equals it exactly
# defect class -> box cut out of the shell (index slices)
DEFECTS = {
    "bilateral": (slice(8, 20), slice(8, 20), slice(18, 28)),
    "parietotemporal": (slice(0, 10), slice(9, 19), slice(8, 20)),
}


def _shell(seed: int) -> np.ndarray:
    """Hollow ellipsoid 'skull' (X, Y, Z) bool, outer radius ~11 voxels, 3 voxels thick."""
    rng = np.random.default_rng(seed)
    radii = 11.0 + rng.uniform(-1.0, 1.0, size=3)
    grid = np.stack(np.meshgrid(*[np.arange(SIZE) - (SIZE - 1) / 2] * 3, indexing="ij"))
    r = np.sqrt(sum((g / a) ** 2 for g, a in zip(grid, radii)))
    return (r <= 1.0) & (r >= 1.0 - 3.0 / radii.mean())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """SkullBreak-like layout (2 skulls x 2 defects) + predictions for three of the four cases."""
    base = tmp_path_factory.mktemp("eval")
    sb = base / "SkullBreak"
    truth = {}
    for idx in range(2):
        case = f"{idx:03d}"
        complete = _shell(idx)
        save_mask(sb / "complete_skull" / f"{case}.nrrd", complete, AFFINE)
        for defect, box in DEFECTS.items():
            implant = np.zeros_like(complete)
            implant[box] = complete[box]
            save_mask(sb / "defective_skull" / defect / f"{case}.nrrd", complete & ~implant, AFFINE)
            save_mask(sb / "implant" / defect / f"{case}.nrrd", implant, AFFINE)
            truth[f"{defect}_{case}"] = (implant, complete & ~implant)
    preds = base / "predictions"
    exact = truth["bilateral_000"][0]
    # imperfect: shifted 1 voxel in z, lower half missing, a false-positive blob in the skull's centre
    shifted = np.roll(truth["parietotemporal_000"][0], 1, axis=2)
    shifted[:, :14] = False
    shifted[12:16, 12:16, 12:16] = True
    empty = np.zeros_like(exact)
    save_mask(preds / "bilateral_000" / "implant.nrrd", exact, AFFINE)
    save_mask(preds / "parietotemporal_000" / "implant.nii.gz", shifted, AFFINE)  # NIfTI fallback
    save_mask(preds / "bilateral_001" / "implant.nrrd", empty, AFFINE)
    save_mask(preds / "bilateral_000" / "implant_mean.nrrd", exact, AFFINE)
    pred = {"bilateral_000": exact, "parietotemporal_000": shifted, "bilateral_001": empty}
    return {"base": base, "preds": preds, "truth": truth, "pred": pred}


def test_case_id():
    assert case_id({"dataset": "skullbreak", "defect": "random_1", "case": "007"}) == "random_1_007"
    assert case_id({"dataset": "skullfix", "defect": "skullfix", "case": "012"}) == "skullfix_012"
    assert case_id({"defective": "/data/patient_a.nii.gz"}) == "patient_a"


def test_missing_prediction_names_case_and_path(data):
    entries = skullbreak_datalist(data["base"], split="all")
    with pytest.raises(FileNotFoundError, match=r"case parietotemporal_001: .*parietotemporal_001/implant\.nrrd"):
        prediction_datalist(entries, data["preds"])
    paired = prediction_datalist(entries, data["preds"], skip_missing=True)
    assert [c["case_id"] for c in paired["cases"]] == ["bilateral_000", "parietotemporal_000", "bilateral_001"]
    assert paired["skipped"] == [
        {"case_id": "parietotemporal_001", "expected": str(data["preds"] / "parietotemporal_001" / "implant.nrrd")}
    ]


@pytest.mark.parametrize(
    "shape, spacing, problem", [((SIZE, SIZE, SIZE - 2), SPACING, "shape"), ((SIZE,) * 3, (0.8, 0.8, 0.8), "spacing")]
)
def test_grid_mismatch_names_both_files(data, tmp_path, shape, spacing, problem):
    entry = skullbreak_datalist(data["base"], split="all", defects=["bilateral"])[0]
    save_mask(tmp_path / "bilateral_000" / "implant.nrrd", np.ones(shape, np.uint8), np.diag([*spacing, 1.0]))
    with pytest.raises(MaskError, match=problem) as err:
        prediction_datalist([entry], tmp_path)
    assert str(tmp_path / "bilateral_000" / "implant.nrrd") in str(err.value) and entry["implant"] in str(err.value)


def test_pixdim_hausdorff_uses_affine_spacing(data):
    gt, _ = data["truth"]["parietotemporal_000"]
    pred = data["pred"]["parietotemporal_000"]
    as_meta = lambda a: MetaTensor(torch.from_numpy(a[None, None]).float(), affine=torch.as_tensor(AFFINE))
    value = PixdimHausdorffDistanceMetric(include_background=True, percentile=95)(as_meta(pred), as_meta(gt))
    assert float(value) == pytest.approx(monai_reference_metrics(pred, gt, SPACING)["monai_hd95"], rel=1e-6)
    with pytest.raises(ValueError, match="MetaTensor"):
        PixdimHausdorffDistanceMetric(percentile=95)(torch.ones(1, 1, 4, 4, 4), torch.ones(1, 1, 4, 4, 4))


def _expected(data, cid):
    gt, skull = data["truth"][cid]
    pred = data["pred"][cid]
    values = {
        "dsc": dice(pred, gt),
        "bdsc": boundary_dice(pred, gt, skull, SPACING, BAND_MM),
        "hd95": hd95(pred, gt, SPACING),
        **monai_reference_metrics(pred, gt, SPACING),
    }
    return {k: None if math.isnan(v) else v for k, v in values.items()}


def test_evaluate_predictions_values_and_files(data, tmp_path):
    entries = skullbreak_datalist(data["base"], split="all")
    report = evaluate_predictions(entries, data["preds"], tmp_path / "out", skip_missing=True, boundary_mm=BAND_MM)
    cases = {r["case_id"]: r for r in report["cases"]}
    assert list(cases) == ["bilateral_000", "parietotemporal_000", "bilateral_001"]
    exact, shifted, empty = (cases[c] for c in cases)
    assert exact["dsc"] == exact["bdsc"] == exact["monai_dice"] == 1.0 and exact["hd95"] == exact["monai_hd95"] == 0.0
    assert empty["dsc"] == empty["bdsc"] == 0.0 and empty["hd95"] is None and empty["monai_hd95"] is None
    for cid, row in cases.items():
        for name, value in _expected(data, cid).items():
            assert row[name] == (None if value is None else pytest.approx(value, abs=1e-6)), (cid, name)
    # imperfect case: the blob is outside the band (bDSC > DSC); pooled HD95 < MONAI's max of directed ones
    assert 0.3 < shifted["dsc"] < shifted["bdsc"] < 0.95
    assert 0 < shifted["hd95"] < shifted["monai_hd95"]
    assert report["skipped"][0]["case_id"] == "parietotemporal_001"

    # means ignore nan (not computable) values; per-class means
    dscs = [r["dsc"] for r in cases.values()]
    assert report["metrics"]["dsc"] == {"mean": pytest.approx(np.mean(dscs)), "std": pytest.approx(np.std(dscs)),
                                        "n": 3}
    assert report["metrics"]["hd95"]["n"] == 2
    assert report["metrics"]["hd95"]["mean"] == pytest.approx((exact["hd95"] + shifted["hd95"]) / 2)
    per = report["per_defect"]
    assert set(per) == {"bilateral", "parietotemporal"} and per["bilateral"]["num_cases"] == 2
    assert per["bilateral"]["metrics"]["dsc"]["mean"] == pytest.approx(0.5)
    assert per["parietotemporal"]["metrics"]["dsc"]["mean"] == pytest.approx(shifted["dsc"])

    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(report))
    md = (out / "metrics.md").read_text()
    assert report["boundary_mm"] == BAND_MM and f"bDSC ({BAND_MM:g} mm band)" in md
    assert "| case | DSC | bDSC | HD95 mm | monai_dice | monai_hd95 mm | defect |" in md
    assert f"| parietotemporal_000 | {shifted['dsc']:.4f} | {shifted['bdsc']:.4f} | {shifted['hd95']:.3f} |" in md
    assert "| bilateral_001 | 0.0000 | 0.0000 | n/a |" in md
    assert f"| **mean** | {np.mean(dscs):.4f} |" in md
    assert "## Per defect class" in md and "| bilateral | 0.5000 ± 0.5000 |" in md
    assert "## Skipped" in md and "parietotemporal_001" in md

    with open(out / "dsc_raw.csv") as f:  # MetricsSaver: per-case CSV labelled with case ids
        rows = list(csv.reader(f, delimiter=","))
    assert [r[0] for r in rows[1:]] == list(cases)
    assert [float(r[1]) for r in rows[1:]] == pytest.approx(dscs, abs=1e-6)
    assert {"metrics.csv", "hd95_raw.csv", "monai_hd95_raw.csv", "bdsc_summary.csv"} <= {p.name for p in out.iterdir()}


@pytest.mark.slow
def test_bundle_run_cli_implant_mean(data, tmp_path):
    """`python -m monai.bundle run` with overrides scores implant_mean and lists the cases without one."""
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/evaluate.json",
           "--dataset_dir", str(data["base"]), "--predictions_dir", str(data["preds"]), "--output_dir", str(out),
           "--split", "all", "--metric", "implant_mean", "--skip_missing", "True"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["prediction_name"] == "implant_mean" and report["num_cases"] == 1
    assert report["cases"][0]["case_id"] == "bilateral_000" and report["cases"][0]["dsc"] == 1.0
    assert sorted(s["case_id"] for s in report["skipped"]) == ["bilateral_001", "parietotemporal_000",
                                                               "parietotemporal_001"]
    assert report["skipped"][0]["expected"].endswith("implant_mean.nrrd")
