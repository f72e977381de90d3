"""``large_files.yml``: the MONAI Model Zoo manifest of the bundle's weight files.

Each entry names a file (``path``, relative to the bundle root), where to download it (``url``) and its
``hash_val`` / ``hash_type``. After replacing weights in ``models/``, refresh the hashes with::

    python -m tools.large_files            # rewrites large_files.yml in the bundle root
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from scripts.cases import file_sha256

BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def read_manifest(path: str | Path) -> tuple[str, list[dict]]:
    """large_files.yml -> (its leading comment block, the ``large_files`` entries)."""
    text = Path(path).read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    return header, (yaml.safe_load(text) or {}).get("large_files") or []


def refresh(bundle_root: str | Path = BUNDLE_ROOT) -> list[dict]:
    """Set every entry's ``hash_val`` to the sha256 of the file it names; rewrite the manifest.

    Raises FileNotFoundError naming the entry whose file is missing. Returns the entries.
    """
    root = Path(bundle_root)
    manifest = root / "large_files.yml"
    header, entries = read_manifest(manifest)
    for entry in entries:
        file = root / entry["path"]
        if not file.is_file():
            raise FileNotFoundError(f"{manifest}: {entry['path']} does not exist")
        entry.update(hash_val=file_sha256(file), hash_type="sha256")
    manifest.write_text(header + yaml.safe_dump({"large_files": entries}, sort_keys=False))
    return entries


if __name__ == "__main__":
    for item in refresh(sys.argv[1] if len(sys.argv) > 1 else BUNDLE_ROOT):
        print(f"{item['hash_val']}  {item['path']}")
