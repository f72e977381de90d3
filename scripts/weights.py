"""Weights files: a network's state dict together with the recipe it was trained with.

A weights file (``models/model.pt`` for the denoiser, ``models/model_voxelizer.pt`` for the voxelizer)
is a dict ``{"network": state_dict, "recipe": {...}}``. The recipe is the training config's ``recipe``
entry (recipe name, preset, point counts and, for the denoiser, prediction type and x0 clipping) plus
the bundle version that wrote the file. Training checkpoints keep their state dict under the same key
(``network``, or ``ema_network`` for the EMA weights), so MONAI's tools read both kinds of file with
``key_in_ckpt="network"``.

Every torch file is read with ``weights_only=True`` (:func:`read_weights_file`): a file whose pickle would
import or call anything beyond tensors and plain containers is refused, so a swapped download cannot run
code. Torch's default allow-list covers every file the bundle writes (``models/*.pt`` and the training
checkpoints, MONAI's ``CheckpointLoader`` included), so no further globals are allow-listed.

A file listed in the bundle's ``large_files.yml`` (by its path below the bundle root) is checked against
the listed SHA-256 when loaded (:func:`weights_hash`): a mismatch is logged as a warning, or refused with
``strict_weights``. User-trained files are not listed; they load unchecked (``verified`` None).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import yaml
from monai.bundle import ConfigParser

from scripts.cases import file_sha256
from scripts.io import atomic_write

__all__ = ["STATE_KEY", "RECIPE_KEY", "UnsafeFileError", "save_weights", "read_weights_file", "recipe_of", "read_recipe",
           "check_recipe", "MANIFEST", "weights_hash", "load_weights"]

STATE_KEY = "network"
RECIPE_KEY = "recipe"
MANIFEST = Path(__file__).resolve().parents[1] / "large_files.yml"  # the bundle's Model Zoo manifest

logger = logging.getLogger(__name__)


class UnsafeFileError(ValueError):
    """A torch file needs more than tensors and plain containers to load (it could run code); it is refused."""


def save_weights(path: str | os.PathLike, state_dict: Mapping, recipe: Mapping, overwrite: bool = False) -> Path:
    """Write ``{"network": state_dict, "recipe": recipe}`` to ``path`` atomically (tensors on the CPU)."""
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: torch.save({STATE_KEY: state, RECIPE_KEY: dict(recipe)}, tmp), overwrite)


def read_weights_file(path: str | os.PathLike, mmap: bool = False):
    """The stored object of a weights file, training checkpoint or bare state dict, read with
    ``weights_only=True`` onto the CPU (``mmap``: tensors memory-mapped, not read).

    Raises FileNotFoundError when ``path`` is missing, :class:`UnsafeFileError` naming the file (and the
    global it asks for) when loading it could run code, ValueError naming the file when it is unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch's errors do not name the file
        unsafe = re.search(r"GLOBAL (\S+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if unsafe:  # the weights-only unpickler refused to import something: the file asks to run code
            raise UnsafeFileError(f"{path}: refused: loading it would import {unsafe.group(1)}, which can run code; "
                                  "weights and checkpoints hold only tensors and plain values") from None
        raise ValueError(f"{path}: cannot read the weights file (corrupt or not a torch file): "
                         f"{type(err).__name__}: {next(iter(str(err).splitlines()), '')}") from None


def training_recipe(config: str | os.PathLike | Sequence[str | os.PathLike],
                    meta_file: str | os.PathLike = Path(__file__).resolve().parents[1] / "configs" / "metadata.json") -> dict:
    """The resolved ``recipe`` of the training config(s), with ``bundle_version`` from ``meta_file``."""
    parser = ConfigParser()
    parser.read_config([str(f) for f in ([config] if isinstance(config, (str, os.PathLike)) else config)])
    if "recipe" not in parser:
        raise KeyError(f"{config}: no 'recipe' entry; pass the training config(s) the checkpoint was trained with")
    return {**parser.get_parsed_content("recipe"), "bundle_version": json.loads(Path(meta_file).read_text())["version"]}


def export_weights(checkpoint: str | os.PathLike, out: str | os.PathLike,
                   config: str | os.PathLike | Sequence[str | os.PathLike], key: str = "network",
                   overwrite: bool = False) -> Path:
    """Save ``checkpoint[key]`` (a state dict: "network" or "ema_network") with the recipe of ``config``
    to ``out``, atomically.

    Raises KeyError naming the checkpoint and its keys when ``key`` is not there, FileExistsError
    when ``out`` exists and not ``overwrite``.
    """
    state = read_weights_file(checkpoint)
    if not isinstance(state, dict) or not isinstance(state.get(key), dict):
        if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
            raise KeyError(f"{checkpoint}: is a bare state dict; export the training checkpoint it came from")
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise KeyError(f"{checkpoint}: no state dict under {key!r} (has {keys})")
    return save_weights(out, state[key], training_recipe(config), overwrite=overwrite)


def recipe_of(stored) -> dict | None:
    """The recipe in an object read by :func:`read_weights_file`, or None (bare state dict, checkpoint)."""
    return stored.get(RECIPE_KEY) if isinstance(stored, dict) else None


def read_recipe(path: str | os.PathLike) -> dict | None:
    """The recipe stored in a weights file, or None (a bare state dict or a training checkpoint)."""
    return recipe_of(read_weights_file(path))


def check_recipe(stored: Mapping | None, expected: Mapping, path: str | os.PathLike) -> None:
    """Raise ValueError naming ``path`` and the first key where ``stored`` differs from ``expected``."""
    if stored is None:
        raise ValueError(f"{path}: the file carries no training recipe; turn the checkpoint into a weights file "
                         "with `python -m tools.export_weights <checkpoint> <out> --config <training config(s)>`")
    for key, value in expected.items():
        if key not in stored or stored[key] != value:
            found = repr(stored[key]) if key in stored else "nothing"
            raise ValueError(f"{path}: recipe mismatch for '{key}': the weights were trained with {found} "
                             f"(recipe {stored.get('name')!r}), the config expects {value!r}")


def weights_hash(path: str | os.PathLike, manifest: str | os.PathLike = MANIFEST) -> tuple[str, bool | None, str]:
    """(SHA-256 of ``path``, whether it equals the ``hash_val`` that ``manifest`` lists for the same file
    (None when the file is not listed), the listed hash or "")."""
    manifest, target = Path(manifest), Path(path).resolve()
    entries = ((yaml.safe_load(manifest.read_text()) or {}).get("large_files") or []) if manifest.is_file() else []
    root = manifest.resolve().parent
    listed = next((str(e.get("hash_val", "")).lower() for e in entries if (root / e["path"]).resolve() == target), None)
    sha = file_sha256(path)
    return sha, None if listed is None else sha == listed, listed or ""


def load_weights(network: torch.nn.Module, path: str | os.PathLike, key: str = STATE_KEY,
                 recipe: Mapping | None = None, strict_weights: bool = False,
                 manifest: str | os.PathLike = MANIFEST) -> torch.nn.Module:
    """Load the ``key`` state dict of a weights file or training checkpoint (or a bare state dict) into network.

    With ``recipe`` the file's recipe must agree with it on every key (see :func:`check_recipe`). A file
    listed in ``manifest`` (large_files.yml) whose SHA-256 differs is loaded with a warning, or refused with ``strict_weights``.
    Raises FileNotFoundError / ValueError naming the file when it is missing, altered (strict) or does not fit.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    sha, verified, listed = weights_hash(path, manifest)
    if verified is False:
        message = (f"{path}: SHA-256 {sha} differs from {listed} listed in {manifest}: not the released file "
                   f"(after training new weights, refresh the hashes: python -m tools.large_files)")
        if strict_weights:
            raise ValueError(f"{message}; refused (--strict_weights true)")
        logger.warning("%s; loading it anyway (--strict_weights true refuses it)", message)
    stored = read_weights_file(path)
    if recipe is not None:
        check_recipe(recipe_of(stored), recipe, path)
    state = stored[key] if isinstance(stored, dict) and isinstance(stored.get(key), dict) else stored
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"weights in {path} do not match the {type(network).__name__} network (wrong preset?): {err}"
        ) from err
    return network


# the presets of models/model.pt and models/model_voxelizer.pt, by the trainer layer that makes them
SHIPPED_PRESETS = {"train_diffusion.json": "small_mirror", "train_voxelizer.json": "small"}


def load_preset_weights(network: torch.nn.Module, path: str | os.PathLike, recipe: Mapping, trainer: str,
                        **kwargs) -> torch.nn.Module:
    """:func:`load_weights` (``kwargs`` go to it) for a job's ``--preset``: when another preset than the shipped
    one is asked and the file is missing or does not fit, the one-line error also says which preset the shipped
    weights are (:data:`SHIPPED_PRESETS`) and gives the command that trains weights of that preset (``trainer``:
    its layer)."""
    try:
        return load_weights(network, path, recipe=recipe, **kwargs)
    except (FileNotFoundError, ValueError) as err:
        preset, shipped = recipe.get("preset"), SHIPPED_PRESETS[trainer]
        if preset == shipped:
            raise
        err.args = (
            f"{err}; the shipped weights are the '{shipped}' preset, no '{preset}' weights ship: train them with "
            f"`python -m monai.bundle run --config_file \"['configs/train_base.json','configs/{trainer}']\" --preset {preset} "
            "--dataset_dir <SkullBreak root>`, export them with `python -m tools.export_weights` (docs/training.md) "
            "and pass them with --denoiser_weights / --voxelizer_weights",
        )
        raise
