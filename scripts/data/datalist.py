"""Datalists for the SkullBreak and SkullFix folder layouts, with seeded train/test splits.

Layouts (REFERENCE.md); masks may be .nrrd, .nii.gz or .nii, file stem = case id ("007")::

    SkullBreak/complete_skull/<id>              SkullFix/complete_skull/<id>
    SkullBreak/defective_skull/<defect>/<id>    SkullFix/defective_skull/<id>
    SkullBreak/implant/<defect>/<id>            SkullFix/implant/<id>

SkullBreak's defect classes (bilateral, frontoorbital, parietotemporal, random_1, random_2) are
taken from the sub-folders of ``defective_skull/``, so other class names (synthetic data) work.

Split rule (by skull, so all defects of one skull share a split):
  * ``split_file`` given: its "train"/"test" ids are used, and its "validation" ids where it has them
    (training's validation and every tuned setting use them; without them "validation" is "test"). Ids on disk but not in the file are
    left out of both; ids in the file but not on disk are skipped with a warning, or raise
    ``FileNotFoundError`` when ``strict=True``.
  * ``split_file=None``: a split is made from the ids present with :func:`make_split`, seed 0 and
    the paper's test fraction (28/114 SkullBreak, 25/100 SkullFix), rounded, at least one test
    case when there are two or more. The shipped files ``configs/splits/*.json`` were made this
    way from the full public id ranges, so both routes give the same split on the full datasets.
  * ``split="all"`` returns every case on disk.

CLI: ``python -m scripts.data.datalist skullbreak --root DATA --out datalist.json``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from scripts.io import MASK_SUFFIXES, MaskError, mask_suffix, read_header_geometry
from scripts.paths import safe_name

__all__ = [
    "SPLIT_FILES",
    "make_split",
    "build_datalist",
    "datalist",
    "case_id",
    "load_split",
    "skullbreak_datalist",
    "skullfix_datalist",
    "write_datalist_json",
]

logger = logging.getLogger(__name__)

SPLIT_FILES = {
    name: Path(__file__).resolve().parents[2] / "configs" / "splits" / f"{name}.json"
    for name in ("skullbreak", "skullfix")
}
_TEST_FRACTION = {"skullbreak": 28 / 114, "skullfix": 25 / 100}
_SPLITS = ("train", "validation", "test", "all")


def case_id(entry: Mapping) -> str:
    """Name of a case's output folder: "<defect>_<case>" (SkullBreak), "skullfix_<case>" (SkullFix),
    else the defective-skull file name without its suffix; made safe by :func:`scripts.paths.safe_name`
    (folder and file names are untrusted)."""
    dataset = entry.get("dataset")
    if dataset == "skullbreak":
        return safe_name(f"{entry['defect']}_{entry['case']}")
    if dataset == "skullfix":
        return safe_name(f"skullfix_{entry['case']}")
    name = Path(entry["defective"]).name
    return safe_name(name[: -len(mask_suffix(name))])


def make_split(case_ids: Iterable[str], num_test: int, seed: int = 0) -> dict[str, list[str]]:
    """Deterministic split of case ids -> {"train": sorted ids, "test": sorted ids}.

    The ids are sorted first, so the result depends only on the id set, ``num_test`` and ``seed``.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("make_split: case_ids contain duplicates")
    if not 0 <= num_test <= len(ids):
        raise ValueError(f"make_split: num_test={num_test} must be in [0, {len(ids)}]")
    order = np.random.default_rng(seed).permutation(len(ids))
    test = {ids[i] for i in order[:num_test]}
    return {"train": [i for i in ids if i not in test], "test": [i for i in ids if i in test]}


def load_split(split_file: str | os.PathLike) -> dict[str, list[str]]:
    """Read a split JSON with disjoint "train", "test" and optional "validation" id lists (missing: the test ids)."""
    split_file = Path(split_file)
    if not split_file.is_file():
        raise FileNotFoundError(f"{split_file}: split file not found")
    try:
        data = json.loads(split_file.read_text())
        split = {k: [str(i) for i in data[k]] for k in ("train", "test")}
        split["validation"] = [str(i) for i in data["validation"]] if "validation" in data else split["test"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{split_file}: not a split file with 'train' and 'test' id lists ({err})") from err
    pairs = [("train", "test"), ("train", "validation")] + ([("validation", "test")] if "validation" in data else [])
    for a, b in pairs:
        overlap = set(split[a]) & set(split[b])
        if overlap:
            raise ValueError(f"{split_file}: ids in both {a} and {b}: {sorted(overlap)[:5]}")
    return split


def _dataset_dir(root: str | os.PathLike, name: str) -> Path:
    """``root/<name>`` or ``root`` itself if it already holds ``defective_skull/``."""
    root = Path(root)
    if not root.is_dir():
        from scripts.data.synthetic import generator_command

        command = generator_command(root) if name == "SkullBreak" else None
        raise FileNotFoundError(f"{root}: dataset root folder not found" + (f"; make it with `{command}`" if command else ""))
    for candidate in (root / name, root):
        if (candidate / "defective_skull").is_dir():
            return candidate.resolve()
    raise FileNotFoundError(f"{root}: no {name} dataset found (expected {root / name / 'defective_skull'})")


def _case_id(path: Path) -> str | None:
    """Case id (file name without the mask suffix), or None if ``path`` is not a mask file."""
    try:
        return path.name[: -len(mask_suffix(path))]
    except MaskError:
        return None


def _masks_by_id(folder: Path) -> dict[str, Path]:
    """Map case id -> mask file for the supported mask files in ``folder``."""
    found = {}
    for path in sorted(folder.iterdir()):
        case = _case_id(path)
        if case is None or not path.is_file():
            continue
        if case in found:
            raise ValueError(f"{folder}: case {case!r} stored twice ({found[case].name}, {path.name})")
        found[case] = path
    return found


def _partner(folder: Path, defective: Path, check: bool) -> Path:
    """The file in ``folder`` with the same case id (same suffix preferred)."""
    suffix = mask_suffix(defective)
    case = _case_id(defective)
    for s in (suffix, *MASK_SUFFIXES):
        if (folder / f"{case}{s}").is_file():
            return folder / f"{case}{s}"
    if check:
        raise FileNotFoundError(f"{folder / (case + suffix)}: missing partner of {defective}")
    return folder / f"{case}{suffix}"


def _check_geometry(entry: dict, cache: dict) -> None:
    """Header-only check that implant and complete skull match the defective skull's grid."""
    for key in ("defective", "implant", "complete"):
        if entry[key] not in cache:
            cache[entry[key]] = read_header_geometry(entry[key])
    shape, spacing = cache[entry["defective"]]
    for key in ("implant", "complete"):
        other_shape, other_spacing = cache[entry[key]]
        if other_shape != shape:
            raise ValueError(f"{entry[key]}: shape {other_shape} differs from {entry['defective']} {shape}")
        if (spacing is None) != (other_spacing is None) or (
            spacing is not None and not np.allclose(spacing, other_spacing, rtol=1e-5)
        ):
            raise ValueError(f"{entry[key]}: spacing {other_spacing} differs from {entry['defective']} {spacing}")


def _select_ids(
    present: Sequence[str], dataset: str, split: str, split_file: str | os.PathLike | None, strict: bool
) -> set[str]:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if split == "all":
        return set(present)
    if split_file is None:
        n = len(present)
        num_test = max(1, round(n * _TEST_FRACTION[dataset])) if n >= 2 else 0
        return set(make_split(present, num_test, seed=0)["test" if split == "validation" else split])
    wanted = load_split(split_file)[split]
    missing = sorted(set(wanted) - set(present))
    if missing:
        msg = f"{split_file}: {len(missing)} {split} ids not on disk, e.g. {missing[:5]}"
        if strict:
            raise FileNotFoundError(msg)
        logger.warning(msg + " (skipped)")
    return set(wanted) & set(present)


def _build(
    root: str | os.PathLike,
    dataset: str,
    split: str,
    split_file: str | os.PathLike | None,
    defects: Sequence[str] | None,
    check: bool,
    strict: bool,
) -> list[dict]:
    base = _dataset_dir(root, "SkullBreak" if dataset == "skullbreak" else "SkullFix")
    if dataset == "skullbreak":
        if defects is None:
            defects = sorted(p.name for p in (base / "defective_skull").iterdir() if p.is_dir())
        folders = {d: (base / "defective_skull" / d, base / "implant" / d) for d in defects}
    else:
        folders = {"skullfix": (base / "defective_skull", base / "implant")}
    defective_files = {}
    for defect, (def_dir, _) in folders.items():
        if not def_dir.is_dir():
            raise FileNotFoundError(f"{def_dir}: defective-skull folder not found")
        defective_files[defect] = _masks_by_id(def_dir)
    present = sorted({case for files in defective_files.values() for case in files})
    if not present:
        raise FileNotFoundError(f"{base / 'defective_skull'}: no mask files ({', '.join(MASK_SUFFIXES)})")
    selected = _select_ids(present, dataset, split, split_file, strict)

    entries, cache = [], {}
    for defect, (_, implant_dir) in folders.items():
        for case, defective in defective_files[defect].items():
            if case not in selected:
                continue
            entry = {
                "defective": str(defective),
                "implant": str(_partner(implant_dir, defective, check)),
                "complete": str(_partner(base / "complete_skull", defective, check)),
                "case": case,
                "defect": defect,
                "dataset": dataset,
            }
            if check:
                _check_geometry(entry, cache)
            entries.append(entry)
    return sorted(entries, key=lambda e: (e["case"], e["defect"]))


def skullbreak_datalist(
    root: str | os.PathLike,
    split: str = "train",
    split_file: str | os.PathLike | None = None,
    defects: Sequence[str] | None = None,
    check: bool = True,
    strict: bool = False,
) -> list[dict]:
    """SkullBreak cases -> list of {"defective", "implant", "complete", "case", "defect", "dataset"}.

    Args:
        root: folder containing ``SkullBreak/``, or the ``SkullBreak`` folder itself.
        split: "train", "validation", "test" or "all" (see the module docstring for the split rule).
        split_file: JSON with "train"/"test" ids, e.g. ``SPLIT_FILES["skullbreak"]``.
        defects: defect classes to include; default every folder in ``defective_skull/``.
        check: require implant/complete partners and matching header shape/spacing.
        strict: raise if ids of the requested split are missing on disk.
    """
    return _build(root, "skullbreak", split, split_file, defects, check, strict)


def skullfix_datalist(
    root: str | os.PathLike,
    split: str = "train",
    split_file: str | os.PathLike | None = None,
    check: bool = True,
    strict: bool = False,
) -> list[dict]:
    """SkullFix cases (``"defect": "skullfix"``); arguments as in :func:`skullbreak_datalist`."""
    return _build(root, "skullfix", split, split_file, None, check, strict)


def write_datalist_json(datalist: Mapping[str, list[dict]], path: str | os.PathLike) -> Path:
    """Write sections such as {"training": [...], "test": [...]} in MONAI's decathlon format.

    ``monai.data.load_decathlon_datalist(path, data_list_key="training")`` reads it back.
    """
    if isinstance(datalist, list) or not all(isinstance(v, list) for v in datalist.values()):
        raise TypeError("write_datalist_json: expected a mapping like {'training': [...], 'test': [...]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(datalist), indent=2) + "\n")
    return path


def build_datalist(
    dataset: str, root: str | os.PathLike, split_file: str | os.PathLike | None = None, **kwargs
) -> dict[str, list[dict]]:
    """The splits of ``dataset`` ("skullbreak" or "skullfix") -> {"train": [...], "validation": [...], "test": [...]}.

    ``kwargs`` go to :func:`skullbreak_datalist` / :func:`skullfix_datalist` (check, strict, defects).
    """
    return {split: datalist(dataset, root, split, split_file, **kwargs) for split in ("train", "validation", "test")}


def datalist(dataset: str, root: str | os.PathLike, split: str = "train", split_file: str | os.PathLike | None = None,
             **kwargs) -> list[dict]:
    """One split of ``dataset`` ("skullbreak" or "skullfix"): :func:`skullbreak_datalist` or :func:`skullfix_datalist`."""
    builders = {"skullbreak": skullbreak_datalist, "skullfix": skullfix_datalist}
    if dataset not in builders:
        raise ValueError(f"dataset must be one of {tuple(builders)}, got {dataset!r}")
    return builders[dataset](root, split=split, split_file=split_file, **kwargs)


def _cli(dataset: str, root: str, out: str, split_file: str | None, **kwargs) -> str:
    lists = build_datalist(dataset, root, split_file=split_file, **kwargs)
    write_datalist_json({"training": lists["train"], "test": lists["test"]}, out)
    return f"{out}: {len(lists['train'])} training, {len(lists['test'])} test entries"


def skullbreak(
    root: str, out: str, split_file: str | None = None, defects: Sequence[str] | None = None, check: bool = True
) -> str:
    """CLI: write a SkullBreak datalist JSON."""
    return _cli("skullbreak", root, out, split_file, check=check, defects=defects)


def skullfix(root: str, out: str, split_file: str | None = None, check: bool = True) -> str:
    """CLI: write a SkullFix datalist JSON."""
    return _cli("skullfix", root, out, split_file, check=check)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m scripts.data.datalist``; ``argv`` defaults to sys.argv[1:]."""
    import fire

    fire.Fire({"skullbreak": skullbreak, "skullfix": skullfix}, command=None if argv is None else list(argv))


if __name__ == "__main__":
    main()
