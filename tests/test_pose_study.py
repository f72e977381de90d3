"""The pose study (tools/pose_study.py): its controls (the roundtrip copy, the resampling floor) and its tables."""

import numpy as np
from scipy.spatial.transform import Rotation

from scripts.data.synthetic import skullbreak_case
from scripts.io import save_mask
from scripts.metrics import dice
from tools.pose_study import _copy, score, tables

TURN = Rotation.from_euler("xyz", [20, -15, 10], degrees=True).as_matrix()


def test_the_roundtrip_copy_is_upright_and_its_truth_untouched():
    case = skullbreak_case(0, size=48, seed=0)
    defective, implant = case.defect("bilateral")
    rotated = _copy(defective, case.affine, "rotated", TURN, truth=False) > 0
    back = _copy(defective, case.affine, "roundtrip", TURN, truth=False) > 0
    assert dice(rotated, defective) < 0.5  # the rotated copy moved
    assert dice(back, defective) > 0.85 and abs(back.sum() / defective.sum() - 1) < 0.05  # two resamplings, upright
    assert np.array_equal(_copy(implant, case.affine, "roundtrip", TURN, truth=True), implant)


def test_the_floor_moves_the_upright_implant_like_the_copy(tmp_path):
    case = skullbreak_case(0, size=48, seed=0)
    defective, implant = case.defect("parietotemporal")
    paths = {name: tmp_path / f"{name}.nii.gz" for name in ("input", "truth", "upright_implant")}
    save_mask(paths["input"], _copy(defective, case.affine, "rotated", TURN, truth=False), case.affine)
    save_mask(paths["truth"], _copy(implant, case.affine, "rotated", TURN, truth=True), case.affine)
    save_mask(paths["upright_implant"], implant.astype(np.uint8), case.affine)
    copy = {"input": str(paths["input"]), "truth": str(paths["truth"]), "linear": TURN.tolist()}
    # the true implant, upright: moved like the copy it is the copy's truth; unmoved it misses it
    assert score(paths["upright_implant"], copy, move_upright=True)["dsc"] == 1.0
    assert score(paths["upright_implant"], copy)["dsc"] < 0.5


def test_the_tables_pair_each_copy_with_its_upright_skull():
    """Means, paired differences with their standard error, and the case-by-case DSC, from hand-made rows."""
    rows = [{"setting": "default", "variant": v, "skull": k, "defect": "bilateral", "dsc": d, "bdsc": d, "hd95": 2.0,
             "refused": False} for k, (up, turned) in enumerate([(0.9, 0.8), (0.7, 0.7)])
            for v, d in (("upright", up), ("rotated", turned))]
    text = tables(rows)
    rotated = next(line for line in text.splitlines() if line.startswith("| default | rotated"))
    cells = [c.strip() for c in rotated.split("|")[1:-1]]
    assert cells[2] == "0.750" and cells[5] == "-0.050" and cells[8] == "0.050" and cells[9] == "0/2"
    assert "| 0, bilateral | 0.900 | 0.800 |" in text and "| 1, bilateral | 0.700 | 0.700 |" in text
