"""Turn a training checkpoint into a weights file for ``models/`` that carries its training recipe.

    python -m tools.export_weights runs/denoiser_small/checkpoints/final.pt models/model.pt --key ema_network \
        --config "['configs/train_base.json','configs/train_diffusion.json','configs/recipes/denoiser_small.json']" --overwrite true
    python -m tools.large_files     # then refresh the checksums in large_files.yml

The recipe is the ``recipe`` entry of the training config(s) the checkpoint was trained with (the same
files, in the same order, as the training command's ``--config_file``), plus the bundle version of
``configs/metadata.json``; the inference config checks it when it loads the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from scripts.weights import read_weights_file, save_weights

ROOT = Path(__file__).resolve().parents[1]


def training_recipe(config: str | os.PathLike | Sequence[str | os.PathLike],
                    meta_file: str | os.PathLike = ROOT / "configs" / "metadata.json") -> dict:
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


if __name__ == "__main__":
    import fire

    fire.Fire(export_weights)
