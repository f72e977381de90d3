"""scripts/paths.py: untrusted names (DICOM UIDs, file and folder names) never become paths outside their folder."""

import numpy as np
import pytest

from scripts.cases import case_datalist
from scripts.data.datalist import case_id
from scripts.io import save_mask
from scripts.paths import MAX_NAME, inside, safe_name, uid_name

HOSTILE = ["../../../../tmp/escaped_case", "/tmp/escaped_case", "1.2.840\0/../../x", "1.2.840\n../x", "..", ".", "",
           "a/b", "a\\b", "~root", "x" * 300, "1.2.3 "]
BAD_UIDS = HOSTILE + ["01.2.3", "1..2", "1.2." + "3" * 70]  # safe as names, not UIDs


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.2", "0", "1.2.3.0.45", "1.2.3\0", "1." + "2" * 62])
def test_a_valid_dicom_uid_names_its_file(uid):
    assert uid_name(uid) == uid.rstrip("\0")


@pytest.mark.parametrize("uid", BAD_UIDS)
def test_any_other_uid_becomes_a_hash(uid, tmp_path):
    name = uid_name(uid)
    assert name.startswith("uid_") and len(name) == 20 and safe_name(name) == name
    assert inside(tmp_path, tmp_path / f"{name}.nii.gz").parent == tmp_path


def test_distinct_uids_get_distinct_names():
    assert len({uid_name(u) for u in BAD_UIDS}) == len(BAD_UIDS)


@pytest.mark.parametrize("name", ["007", "bilateral_007", "case-1.v2", "A+B"])
def test_plain_names_stay_as_they_are(name):
    assert safe_name(name) == name


@pytest.mark.parametrize("name", HOSTILE + ["skull 01", "schädel_ü", "頭蓋骨", "..hidden", "a\0b", "a\nb"])
def test_other_names_become_one_safe_component(name, tmp_path):
    safe = safe_name(name)
    assert safe != name and not safe.startswith(".") and len(safe) <= MAX_NAME
    assert safe.isascii() and "/" not in safe and "\\" not in safe and safe.isprintable() and " " not in safe
    assert inside(tmp_path, tmp_path / safe).parent == tmp_path
    assert safe_name(name + "x") != safe  # the hash keeps names that clean up alike apart


def test_input_names_with_dots_spaces_and_non_ascii_give_safe_case_folders(tmp_path):
    """Real files with such names are listed as cases whose folder names are safe and distinct."""
    inputs = tmp_path / "in"
    names = ["...nrrd", "skull 01.nrrd", "skull_01.nrrd", "schädel.nii.gz", "..nii"]
    for name in names:
        save_mask(inputs / name, np.ones((4, 4, 4), np.uint8), np.eye(4))
    cases = [c["case"] for c in case_datalist(str(inputs))]
    assert len(set(cases)) == len(names) and "skull_01" in cases
    for case in cases:
        assert case == safe_name(case) and inside(tmp_path / "out", tmp_path / "out" / case)


def test_datalist_case_ids_from_hostile_folder_names_are_safe():
    entry = {"dataset": "skullbreak", "defect": "../../etc", "case": "007", "defective": "x.nrrd"}
    assert case_id(entry) == safe_name("../../etc_007") and "/" not in case_id(entry)
    assert case_id({"defective": "/data/../ü.nrrd"}) == safe_name("ü")


def test_inside_refuses_traversal_absolute_paths_and_symlinks_out(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "case").symlink_to(elsewhere)
    for path in (out / ".." / "x", out / "/tmp/x", out / "case", out / "case" / "implant.nrrd", out):
        with pytest.raises(ValueError, match=r"outside the folder .*; refused$"):
            inside(out, path)
    assert inside(out, out / "a" / "b.nrrd") == out / "a" / "b.nrrd"
