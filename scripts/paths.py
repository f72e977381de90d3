"""Untrusted strings as path components: case names from file or folder names, DICOM UIDs.

Names come from outside (a hospital's file names, a datalist, DICOM tags from a PACS), so none is used
as a path as it is: :func:`safe_name` turns any string into one harmless file-name component,
:func:`uid_name` keeps a valid DICOM UID and maps anything else to a hash, and :func:`inside` checks
that a path built from them resolves inside the folder it is meant for (symlinks followed).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

__all__ = ["MAX_NAME", "safe_name", "uid_name", "inside"]

MAX_NAME = 100  # characters; file systems allow 255 bytes, and a case folder holds names longer than its own
_SAFE = re.compile(r"[A-Za-z0-9._+-]+")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
# DICOM PS3.5 6.2 value representation UI: components of digits, no leading zero, dot separated, at most 64 chars
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _digest(text: str, n: int) -> str:
    return hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()[:n]


def safe_name(text: str) -> str:
    """``text`` as one file-name component: unchanged when it is ASCII letters, digits and ``._+-``, does not
    start with a dot (no ``..``, no hidden files) and has at most MAX_NAME characters; otherwise its safe
    characters (others as ``_``) plus ``_`` and 8 hex digits of its SHA-256, so distinct names stay distinct."""
    text = str(text)
    if _SAFE.fullmatch(text) and not text.startswith(".") and len(text) <= MAX_NAME:
        return text
    return f"{_UNSAFE.sub('_', text).lstrip('.')[: MAX_NAME - 9]}_{_digest(text, 8)}"


def uid_name(uid: str) -> str:
    """A DICOM UID as a file-name component: the UID itself when it follows the UI grammar (one trailing
    NUL pad allowed), else ``uid_`` and 16 hex digits of its SHA-256 (never a path, whatever the tag holds)."""
    text = str(uid)
    text = text[:-1] if text.endswith("\0") else text
    return text if len(text) <= 64 and _UID.fullmatch(text) else f"uid_{_digest(str(uid), 16)}"


def inside(folder: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` if it resolves (symlinks followed) to a place below ``folder``; else ValueError naming both."""
    root, target = Path(folder).resolve(), Path(path).resolve()
    if target == root or not target.is_relative_to(root):
        raise ValueError(f"{path}: resolves to {target}, outside the folder {root}; refused")
    return Path(path)
