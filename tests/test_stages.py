"""Training in stages with one command (configs/train_denoiser_mirror.json, scripts/stages.py): each stage
trains from the previous stage's exported weights, a finished stage is skipped when the command runs
again, and the last stage's weights are the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import run

from scripts.data.synthetic import generate_skullbreak
from scripts.stages import run_stages, stage_dir
from scripts.weights import read_weights_file

ROOT = Path(__file__).resolve().parents[1]
# the shipped recipe (with its mirror condition) at the tiny preset on 40^3 skulls, a few iterations per stage
TINY = {"preset": "tiny", "num_mirror": 64, "surface_points": 2000, "surface_transforms#3#num_points": 2000, "batch_size": 2,
        "split_file": None, "max_epochs": 1, "val_interval": 100, "log_interval": 1}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """Four 40^3 skulls with a bilateral defect: 3 train, 1 test."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_skullbreak(root, num_cases=4, size=40, seed=0, defects="bilateral")
    return root


def _overlay(path: Path, **keys) -> str:
    path.write_text(json.dumps({**TINY, **keys}))
    return str(path)


@pytest.mark.slow
def test_stages_hand_their_weights_on_and_a_second_run_skips_finished_stages(dataset_dir, tmp_path):
    stages = [
        {"name": "first", "configs": [_overlay(tmp_path / "first.json", epoch_length=4)]},
        # lr 0: the second stage's weights stay those it started from
        {"name": "second", "configs": [_overlay(tmp_path / "second.json", epoch_length=2, learning_rate=0.0,
                                                **{"recipe#name": "second_stage"})]},
    ]
    out = tmp_path / "run"
    command = dict(config_file=str(ROOT / "configs" / "train_denoiser_mirror.json"), bundle_root=str(ROOT),
                   output_dir=str(out), dataset_dir=str(dataset_dir), stages=stages)
    run(**command)

    first, second = (stage_dir(out, i, s["name"]) for i, s in enumerate(stages))
    assert torch.load(first / "checkpoints" / "final.pt", weights_only=False)["trainer"]["iteration"] == 4
    assert torch.load(second / "checkpoints" / "final.pt", weights_only=False)["trainer"]["iteration"] == 2
    start, end = (read_weights_file(d / "weights.pt") for d in (first, second))
    assert start["recipe"]["name"] == "denoiser_mirror" and end["recipe"]["name"] == "second_stage"
    assert start["recipe"]["preset"] == "tiny"
    second_network = torch.load(second / "checkpoints" / "final.pt", weights_only=False)["network"]
    assert all(torch.equal(second_network[k], v) for k, v in start["network"].items())  # started from stage 1
    result = read_weights_file(out / "model.pt")
    assert all(torch.equal(result["network"][k], v) for k, v in end["network"].items())
    assert result["recipe"] == {**end["recipe"], "name": "train_denoiser_mirror"}  # named after the staged command

    files = [d / name for d in (first, second) for name in ("weights.pt", "checkpoints/final.pt")]
    stamps = [f.stat().st_mtime_ns for f in files]
    run(**command)  # both stages are done: nothing trains or exports again
    assert [f.stat().st_mtime_ns for f in files] == stamps

    # the result is not written over a different file unless asked
    other = tmp_path / "other.pt"
    other.write_bytes(b"not these weights")
    with pytest.raises(RuntimeError) as failure:  # MONAI wraps what the config's expression raised
        run(**{**command, "weights_file": str(other)})
    assert isinstance(failure.value.__cause__, FileExistsError) and "other.pt" in str(failure.value.__cause__)
    assert other.read_bytes() == b"not these weights"
    run(**{**command, "weights_file": str(other), "overwrite": True})
    written = read_weights_file(other)  # the same weights and recipe (torch.save names the archive after the file)
    assert written["recipe"] == result["recipe"]
    assert all(torch.equal(written["network"][k], v) for k, v in result["network"].items())


def test_stages_need_unique_names(tmp_path):
    for stages in ([], [{"name": "a"}, {"name": "a"}], [{"configs": []}]):
        with pytest.raises(ValueError, match="stage"):
            run_stages(stages, [], tmp_path, tmp_path / "model.pt")
