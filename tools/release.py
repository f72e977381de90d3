"""The bundle's Model Zoo release: ``OUT_DIR/cranial_implant_pcdiff_v<version>.zip``.

    python -m tools.release OUT_DIR          # version from configs/metadata.json

The zip holds one folder, ``cranial_implant_pcdiff/``, with what a Zoo bundle ships (configs/, models/,
scripts/, docs/, LICENSE, large_files.yml) and sample/, which inference.json runs on by default. Tests,
developer tools and training checkpoints stay out; large_files.yml names the checkpoints with their URL
and SHA-256 (``python -m monai.bundle download_large_files --bundle_path <bundle>`` fetches them).
Before writing, MONAI's verify_metadata checks metadata.json against the shipped schema and every
large_files.yml entry is checked against its file; the zip must stay within the Zoo's ``MAX_MB``.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from monai.apps.utils import check_hash
from monai.bundle import verify_metadata

from scripts.io import atomic_write
from tools.large_files import BUNDLE_ROOT, read_manifest

BUNDLE_NAME = "cranial_implant_pcdiff"
PARTS = ("configs", "models", "scripts", "docs", "sample", "LICENSE", "large_files.yml")
MAX_MB = 30


def bundle_files(root: str | os.PathLike = BUNDLE_ROOT) -> list[Path]:
    """The files of ``PARTS`` under ``root`` (no ``__pycache__``), sorted."""
    root = Path(root)
    found = []
    for part in PARTS:
        path = root / part
        if not path.exists():
            raise FileNotFoundError(f"{path}: part of the bundle not found")
        found += [f for f in (path.rglob("*") if path.is_dir() else [path]) if f.is_file() and "__pycache__" not in f.parts]
    return sorted(found)


def check_bundle(root: str | os.PathLike = BUNDLE_ROOT) -> str:
    """MONAI's metadata check on the shipped schema, and every large_files.yml entry present with its hash.
    Returns the bundle version; raises ValueError / FileNotFoundError naming the file and problem."""
    root = Path(root)
    meta = root / "configs" / "metadata.json"
    schema = root / "configs" / "schema" / Path(json.loads(meta.read_text())["schema"]).name
    verify_metadata(meta_file=str(meta), filepath=str(schema))
    manifest = root / "large_files.yml"
    for entry in read_manifest(manifest)[1]:
        file = root / entry["path"]
        if not file.is_file():
            raise FileNotFoundError(f"{manifest}: {entry['path']} does not exist")
        if not check_hash(file, entry["hash_val"], entry["hash_type"]):
            raise ValueError(f"{manifest}: {entry['path']} does not have the listed {entry['hash_type']} "
                             "(refresh it with `python -m tools.large_files`)")
    return json.loads(meta.read_text())["version"]


def release(out_dir: str | os.PathLike, root: str | os.PathLike = BUNDLE_ROOT, overwrite: bool = False) -> Path:
    """Write ``out_dir/cranial_implant_pcdiff_v<version>.zip`` (atomically); returns its path.
    Raises ValueError when it would exceed ``MAX_MB``, FileExistsError when it exists and not ``overwrite``."""
    root = Path(root).resolve()
    version = check_bundle(root)
    out = Path(out_dir) / f"{BUNDLE_NAME}_v{version}.zip"

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in bundle_files(root):
                archive.write(file, f"{BUNDLE_NAME}/{file.relative_to(root).as_posix()}")
        size_mb = os.path.getsize(tmp) / 2**20
        if size_mb > MAX_MB:
            raise ValueError(f"{out}: {size_mb:.1f} MB, over the Model Zoo's {MAX_MB} MB: move files to large_files.yml")

    return atomic_write(out, write, overwrite=overwrite)


if __name__ == "__main__":
    import fire

    from scripts.cli import as_bool, install_error_report

    install_error_report()
    fire.Fire(lambda out_dir, overwrite=False: print(release(out_dir, overwrite=as_bool(overwrite, "overwrite"))))
