"""Warm-start weights for v-prediction from an x0-prediction denoiser.

In the VP process, v-prediction estimates ``x0 = sqrt(abar) x_t - sqrt(1 - abar) v``: a skip term
in ``x_t`` plus ``-v`` scaled by ``sqrt(1 - abar)`` (Karras et al.'s preconditioning with unit data
scale). At high noise (abar -> 0) this is ``x0 ~ -v``. Negating the last layer of an x0 network
therefore gives a v network that starts out predicting what the x0 network predicted where the
noise is high, and that is close to the identity (``x0 ~ x_t / sqrt(abar)``) where it is low. Fine-tuning
from that start keeps the x0 network's shape knowledge; starting from the un-negated weights makes
the network first learn to flip its output's sign (measured: held-out error at high noise doubled
over the first 600 iterations).

    python -m tools.x0_to_v models/model_0.5.0.pt runs/denoiser_v_init.pt
"""

from __future__ import annotations

import os
from pathlib import Path

from scripts.weights import STATE_KEY, read_weights_file, recipe_of, save_weights

HEAD = "head.2"  # the denoiser's last layer: Conv1d(hidden, 3, 1) of PVCNN2Denoiser.head


def x0_to_v(weights: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``weights`` (an x0-prediction weights file) with its last layer negated and its recipe's
    prediction type set to ``v_prediction`` to ``out``, atomically."""
    stored = read_weights_file(weights)
    recipe = recipe_of(stored)
    if recipe is None or recipe.get("prediction_type") != "sample":
        found = None if recipe is None else recipe.get("prediction_type")
        raise ValueError(f"{weights}: needs an x0-prediction ('sample') weights file with a recipe, got {found!r}")
    state = dict(stored[STATE_KEY])
    for name in (f"{HEAD}.weight", f"{HEAD}.bias"):
        if name not in state:
            raise KeyError(f"{weights}: no {name!r}; not a PVCNN2Denoiser state dict")
        state[name] = -state[name]
    return save_weights(out, state, {**recipe, "prediction_type": "v_prediction"}, overwrite=overwrite)


if __name__ == "__main__":
    import fire

    fire.Fire(x0_to_v)
