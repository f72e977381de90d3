"""SkullBreak / SkullFix datalists on tiny fake layouts, seeded splits and the error cases."""

import json
from pathlib import Path

import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from scripts.data.datalist import (
    SPLIT_FILES,
    build_datalist,
    main,
    make_split,
    skullbreak_datalist,
    skullfix_datalist,
    write_datalist_json,
)
from scripts.io import save_mask

ROOT = Path(__file__).resolve().parents[1]

DEFECTS = ("bilateral", "random_1")


def _cube(lo, hi, n=16):
    m = np.zeros((n, n, n), np.uint8)
    m[lo:hi, lo:hi, lo:hi] = 1
    return m


def _triplet(complete, defective, implant, spacing=(0.4, 0.4, 0.4)):
    aff = np.diag([*spacing, 1.0])
    save_mask(complete, _cube(2, 14), aff, overwrite=True)
    save_mask(defective, _cube(2, 10), aff)
    save_mask(implant, _cube(10, 14), aff)


def _skullbreak(root, ids=range(10), defects=DEFECTS):
    base = root / "SkullBreak"
    for d in defects:
        for sub in ("defective_skull", "implant"):
            (base / sub / d).mkdir(parents=True, exist_ok=True)
    (base / "complete_skull").mkdir(parents=True, exist_ok=True)
    for i in ids:
        for d in defects:
            name = f"{i:03d}.nrrd"
            _triplet(base / "complete_skull" / name, base / "defective_skull" / d / name, base / "implant" / d / name)
    return base


def _skullfix(root, ids=range(8)):
    base = root / "SkullFix"
    for sub in ("complete_skull", "defective_skull", "implant"):
        (base / sub).mkdir(parents=True)
    for i in ids:
        paths = (base / sub / f"{i:03d}.nrrd" for sub in ("complete_skull", "defective_skull", "implant"))
        _triplet(*paths, spacing=(0.45, 0.45, 0.6))
    return base


@pytest.fixture(scope="module")
def skullbreak_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    _skullbreak(root)
    return root


def test_make_split_deterministic_disjoint_and_matches_shipped_files():
    ids = [f"{i:03d}" for i in range(114)]
    split = make_split(ids, 28, seed=0)
    assert split == make_split(list(reversed(ids)), 28, seed=0)  # order of the input does not matter
    assert split != make_split(ids, 28, seed=1)
    assert len(split["train"]) == 86 and len(split["test"]) == 28
    assert not set(split["train"]) & set(split["test"]) and set(split["train"]) | set(split["test"]) == set(ids)
    for name, n, num_test in (("skullbreak", 114, 28), ("skullfix", 100, 25)):
        shipped = json.loads(SPLIT_FILES[name].read_text())
        assert shipped["seed"] == 0 and shipped["source"]
        expected = make_split([f"{i:03d}" for i in range(n)], num_test, seed=shipped["seed"])
        assert {k: shipped[k] for k in ("train", "test")} == expected
    with pytest.raises(ValueError, match="num_test"):
        make_split(ids[:3], 4, seed=0)
    with pytest.raises(ValueError, match="duplicates"):
        make_split(["001", "001"], 1, seed=0)


def test_skullbreak_lists_and_on_the_fly_split(skullbreak_root):
    train = skullbreak_datalist(skullbreak_root, "train")
    test = skullbreak_datalist(skullbreak_root / "SkullBreak", "test")  # the SkullBreak folder itself works too
    every = skullbreak_datalist(skullbreak_root, "all")
    assert len(every) == 20 and len(test) == 2 * len(DEFECTS)  # round(10 * 28/114) = 2 test skulls
    train_cases, test_cases = {e["case"] for e in train}, {e["case"] for e in test}
    assert not train_cases & test_cases and len(train_cases | test_cases) == 10
    assert test_cases == set(make_split([f"{i:03d}" for i in range(10)], 2, seed=0)["test"])
    entry = next(e for e in every if e["case"] == "007" and e["defect"] == "random_1")
    base = (skullbreak_root / "SkullBreak").resolve()
    assert entry == {
        "defective": str(base / "defective_skull/random_1/007.nrrd"),
        "implant": str(base / "implant/random_1/007.nrrd"),
        "complete": str(base / "complete_skull/007.nrrd"),
        "case": "007",
        "defect": "random_1",
        "dataset": "skullbreak",
    }
    assert {e["defect"] for e in skullbreak_datalist(skullbreak_root, "all", defects=["bilateral"])} == {"bilateral"}


def test_shipped_split_file_and_strict(skullbreak_root, caplog):
    shipped = json.loads(SPLIT_FILES["skullbreak"].read_text())
    test = skullbreak_datalist(skullbreak_root, "test", split_file=SPLIT_FILES["skullbreak"])
    assert {e["case"] for e in test} == set(shipped["test"]) & {f"{i:03d}" for i in range(10)}
    assert "not on disk" in caplog.text
    with pytest.raises(FileNotFoundError, match="ids not on disk"):
        skullbreak_datalist(skullbreak_root, "test", split_file=SPLIT_FILES["skullbreak"], strict=True)
    with pytest.raises(ValueError, match="split must be one of"):
        skullbreak_datalist(skullbreak_root, "val")
    # without "validation" ids the validation split is the test split
    assert skullbreak_datalist(skullbreak_root, "validation", split_file=SPLIT_FILES["skullbreak"]) == test


def test_split_file_with_validation_ids(skullbreak_root, tmp_path):
    """A split file's "validation" ids form their own split, disjoint from train and test."""
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["000", "001", "002"], "validation": ["003"], "test": ["004", "005"]}))
    lists = build_datalist("skullbreak", skullbreak_root, split_file=split)
    assert {k: sorted({e["case"] for e in v}) for k, v in lists.items()} == {
        "train": ["000", "001", "002"], "validation": ["003"], "test": ["004", "005"]}
    split.write_text(json.dumps({"train": ["000"], "validation": ["000"], "test": ["004"]}))
    with pytest.raises(ValueError, match="both train and validation"):
        build_datalist("skullbreak", skullbreak_root, split_file=split)
    shipped = json.loads((ROOT / "configs" / "splits" / "synthetic_wide.json").read_text())
    assert not (set(shipped["train"]) & set(shipped["validation"]) or set(shipped["train"]) & set(shipped["test"])
                or set(shipped["validation"]) & set(shipped["test"]))


def test_skullfix_datalist(tmp_path):
    _skullfix(tmp_path)
    train, test = skullfix_datalist(tmp_path, "train"), skullfix_datalist(tmp_path, "test")
    assert build_datalist("skullfix", tmp_path) == {"train": train, "validation": test, "test": test}
    with pytest.raises(ValueError, match="dataset must be one of"):
        build_datalist("skullbrake", tmp_path)
    assert len(test) == 2 and len(train) == 6  # round(8 * 25/100) = 2
    assert {e["defect"] for e in train + test} == {"skullfix"} and {e["dataset"] for e in test} == {"skullfix"}
    assert all(Path(e["implant"]).parent.name == "implant" and Path(e["implant"]).is_file() for e in test)


def test_datalist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset root folder not found"):
        skullbreak_datalist(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no SkullBreak dataset"):
        skullbreak_datalist(tmp_path)
    base = _skullbreak(tmp_path, ids=range(3), defects=("bilateral",))
    with pytest.raises(FileNotFoundError, match="random_2: defective-skull folder not found"):
        skullbreak_datalist(tmp_path, "all", defects=["random_2"])

    (base / "implant/bilateral/001.nrrd").unlink()
    with pytest.raises(FileNotFoundError, match=r"implant/bilateral/001.nrrd: missing partner"):
        skullbreak_datalist(tmp_path, "all")
    assert len(skullbreak_datalist(tmp_path, "all", check=False)) == 3  # check=False only lists paths
    save_mask(base / "implant/bilateral/001.nrrd", _cube(10, 14, n=18)[:16], np.diag([0.4, 0.4, 0.4, 1]))
    with pytest.raises(ValueError, match=r"001.nrrd: shape \(16, 18, 18\) differs"):
        skullbreak_datalist(tmp_path, "all")
    save_mask(base / "implant/bilateral/001.nrrd", _cube(10, 14), np.diag([0.4, 0.4, 0.5, 1]), overwrite=True)
    with pytest.raises(ValueError, match=r"implant/bilateral/001.nrrd: spacing .* differs"):
        skullbreak_datalist(tmp_path, "all")

    bad = tmp_path / "bad_split.json"
    bad.write_text(json.dumps({"train": ["000"], "test": ["000"]}))
    with pytest.raises(ValueError, match="in both train and test"):
        skullbreak_datalist(tmp_path, "train", split_file=bad, check=False)


def test_write_datalist_json_and_cli(skullbreak_root, tmp_path, capsys):
    lists = build_datalist("skullbreak", skullbreak_root)
    sections = {"training": lists["train"], "test": lists["test"]}
    path = write_datalist_json(sections, tmp_path / "list.json")
    assert load_decathlon_datalist(path, is_segmentation=False, data_list_key="training") == sections["training"]
    assert load_decathlon_datalist(path, is_segmentation=False, data_list_key="test") == sections["test"]
    with pytest.raises(TypeError, match="mapping"):
        write_datalist_json(sections["training"], tmp_path / "x.json")

    out = tmp_path / "cli.json"
    main(["skullbreak", "--root", str(skullbreak_root), "--out", str(out)])  # what `python -m ...` runs
    assert json.loads(out.read_text()) == sections
    assert "16 training, 4 test entries" in capsys.readouterr().out
