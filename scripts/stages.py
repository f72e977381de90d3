"""Training in stages, one ``python -m monai.bundle run`` command for the whole schedule.

A shipped network may come from several training runs in a row (e.g. a long run at batch 8, then a
short one at batch 16 from its EMA weights). ``run_stages`` runs them one after another in-process,
each as its own train workflow (the trainer configs plus the stage's overlays and overrides) in its
own folder, and hands each stage's exported weights to the next as ``init_weights``. A stage whose
weights file exists is done and skipped, and an unfinished stage resumes from its own checkpoints,
so the same command carries on after an interruption.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from monai.bundle import ConfigWorkflow

import torch

from scripts.weights import RECIPE_KEY, STATE_KEY, export_weights, read_weights_file, save_weights

logger = logging.getLogger(__name__)

STAGE_WEIGHTS = "weights.pt"


def stage_dir(output_dir: str | os.PathLike, index: int, name: str) -> Path:
    """Folder of stage ``index`` (0-based): ``<output_dir>/<index + 1>_<name>``."""
    return Path(output_dir) / f"{index + 1}_{name}"


def run_stages(stages: Sequence[dict], trainer_configs: Sequence[str], output_dir: str | os.PathLike,
               weights_file: str | os.PathLike, overrides: dict | None = None, key: str = "ema_network",
               overwrite: bool = False, recipe_name: str | None = None) -> Path:
    """Run the training ``stages`` in order; returns ``weights_file``, the last stage's weights.

    stages: dicts with "name", "configs" (overlays after ``trainer_configs``) and optional "overrides"
    (config keys of that stage; "init_weights" there starts the first stage from a file). Every stage
    also gets ``overrides`` (shared keys such as ``dataset_dir`` and ``seed``), its folder as
    ``output_dir`` and, from the second stage on, the previous stage's weights as ``init_weights``.
    Each stage's ``final.pt`` is exported (``key``, the EMA weights by default) with the recipe of its
    configs to ``<stage folder>/weights.pt``, which marks the stage done. An existing ``weights_file``
    with other contents is only replaced with ``overwrite``.
    """
    if not stages:
        raise ValueError("run_stages needs at least one stage")
    names = [stage.get("name") for stage in stages]
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"every stage needs a unique, non-empty 'name', got {names}")
    previous = None
    for index, stage in enumerate(stages):
        folder = stage_dir(output_dir, index, stage["name"])
        weights = folder / STAGE_WEIGHTS
        configs = [*trainer_configs, *stage.get("configs", [])]
        if weights.is_file():
            logger.info(f"stage {index + 1}/{len(stages)} '{stage['name']}': done ({weights}), skipped")
        else:
            logger.info(f"stage {index + 1}/{len(stages)} '{stage['name']}': training in {folder}")
            settings = {**(overrides or {}), **stage.get("overrides", {}), "output_dir": str(folder)}
            if previous is not None:
                settings["init_weights"] = str(previous)
            workflow = ConfigWorkflow(config_file=list(configs), workflow_type="train", **settings)
            workflow.initialize()
            workflow.run()
            workflow.finalize()
            final = Path(workflow.parser.get_parsed_content("ckpt_dir")) / "final.pt"
            export_weights(final, weights, configs, key=key, overwrite=True)
        previous = weights
    out = Path(weights_file)
    result = read_weights_file(previous)
    recipe = {**result[RECIPE_KEY], **({"name": recipe_name} if recipe_name else {})}
    if not (out.is_file() and _holds(out, result[STATE_KEY], recipe)):
        save_weights(out, result[STATE_KEY], recipe, overwrite=overwrite)
    logger.info(f"weights of the last stage: {out}")
    return out


def _holds(path: Path, state: dict, recipe: dict) -> bool:
    """Whether the file ``path`` is a weights file of exactly ``state`` and ``recipe``."""
    try:
        stored = read_weights_file(path)
    except ValueError:  # not a weights file
        return False
    if not isinstance(stored, dict) or stored.get(RECIPE_KEY) != recipe or stored.get(STATE_KEY, {}).keys() != state.keys():
        return False
    return all(torch.equal(stored[STATE_KEY][k], v) for k, v in state.items())
