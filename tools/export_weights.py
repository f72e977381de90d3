"""Turn a training checkpoint into a bare weights file for ``models/`` (what the inference config loads).

    python -m tools.export_weights runs/diffusion/checkpoints/final.pt models/denoiser_small.pt --key ema_network
    python -m tools.large_files     # then refresh the checksums in large_files.yml
"""

from __future__ import annotations

import os
from pathlib import Path

import fire
import torch

from scripts.io import atomic_write


def export_weights(checkpoint: str | os.PathLike, out: str | os.PathLike, key: str = "network",
                   overwrite: bool = False) -> Path:
    """Save ``checkpoint[key]`` (a state dict: "network" or "ema_network") to ``out``, atomically.

    Raises KeyError naming the checkpoint and its keys when ``key`` is not there, FileExistsError
    when ``out`` exists and not ``overwrite``.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or not isinstance(state.get(key), dict):
        if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
            raise KeyError(f"{checkpoint}: is a bare state dict already; copy it as it is")
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise KeyError(f"{checkpoint}: no state dict under {key!r} (has {keys})")
    return atomic_write(out, lambda tmp: torch.save(state[key], tmp), overwrite=overwrite)


if __name__ == "__main__":
    fire.Fire(export_weights)
