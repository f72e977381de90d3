"""Weights files: a network's state dict together with the recipe it was trained with.

A weights file (``models/model.pt`` for the denoiser, ``models/model_voxelizer.pt`` for the voxelizer)
is a dict ``{"network": state_dict, "recipe": {...}}``. The recipe is the training config's ``recipe``
entry (recipe name, preset, point counts and, for the denoiser, prediction type and x0 clipping) plus
the bundle version that wrote the file. Training checkpoints keep their state dict under the same key
(``network``, or ``ema_network`` for the EMA weights), so MONAI's tools read both kinds of file with
``key_in_ckpt="network"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from scripts.io import atomic_write

__all__ = ["STATE_KEY", "RECIPE_KEY", "save_weights", "read_weights_file", "recipe_of", "read_recipe", "check_recipe",
           "load_weights"]

STATE_KEY = "network"
RECIPE_KEY = "recipe"


def save_weights(path: str | os.PathLike, state_dict: Mapping, recipe: Mapping, overwrite: bool = False) -> Path:
    """Write ``{"network": state_dict, "recipe": recipe}`` to ``path`` atomically (tensors on the CPU)."""
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: torch.save({STATE_KEY: state, RECIPE_KEY: dict(recipe)}, tmp), overwrite)


def read_weights_file(path: str | os.PathLike) -> dict:
    """The stored object of a weights file, training checkpoint or bare state dict (on the CPU).
    Raises FileNotFoundError / ValueError naming the file when it is missing or cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch's errors for a cut-short or foreign file do not name it
        raise ValueError(f"{path}: cannot read the weights file (corrupt or not a torch file): {err}") from err


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


def load_weights(network: torch.nn.Module, path: str | os.PathLike, key: str = STATE_KEY,
                 recipe: Mapping | None = None) -> torch.nn.Module:
    """Load the ``key`` state dict of a weights file or training checkpoint (or a bare state dict) into network.

    With ``recipe`` the file's recipe must agree with it on every key (see :func:`check_recipe`).
    Raises FileNotFoundError / ValueError naming the file when it is missing or does not fit.
    """
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


SHIPPED_PRESET = "small"  # the preset of models/model.pt and models/model_voxelizer.pt


def load_preset_weights(network: torch.nn.Module, path: str | os.PathLike, recipe: Mapping, trainer: str,
                        **kwargs) -> torch.nn.Module:
    """:func:`load_weights` (``kwargs`` go to it) for a job's ``--preset``: when another preset than the shipped
    one is asked and the file is missing or does not fit, the one-line error also says that the shipped weights
    are the ``small`` preset and gives the command that trains weights of that preset (``trainer``: its layer)."""
    try:
        return load_weights(network, path, recipe=recipe, **kwargs)
    except (FileNotFoundError, ValueError) as err:
        preset = recipe.get("preset")
        if preset == SHIPPED_PRESET:
            raise
        err.args = (
            f"{err}; the shipped weights are the '{SHIPPED_PRESET}' preset, no '{preset}' weights ship: train them with "
            f"`python -m monai.bundle run --config_file \"['configs/train_base.json','configs/{trainer}']\" --preset {preset} "
            "--dataset_dir <SkullBreak root>`, export them with `python -m tools.export_weights` (docs/training.md) "
            "and pass them with --denoiser_weights / --voxelizer_weights",
        )
        raise
