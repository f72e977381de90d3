"""End-to-end tests of the voxelizer trainer (configs/train_base.json + configs/train_voxelizer.json) on small
synthetic skulls (tiny preset)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric

from bundle_training import train_in_process

from scripts.data.datalist import build_datalist
from scripts.data.resample import pad_to_cube
from scripts.data.synthetic import generate_skullbreak
from scripts.weights import load_weights
from scripts.io import load_mask
from scripts.networks.sap import SAPVoxelizer

CONFIG = ["configs/train_base.json", "configs/train_voxelizer.json"]
SIZE, MARGIN = 48, 8  # cube side 48 + 2 * 8 = 64 = DPSR resolution: the mask is compared voxel for voxel


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """Six 48^3 skulls (one defect class; the voxelizer only uses the complete skulls): 5 train, 1 test."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_skullbreak(root, num_cases=6, size=SIZE, seed=0, defects="bilateral")
    return root


def train(dataset_dir, output_dir, **override):
    """Run the voxelizer bundle in-process (tiny preset); returns (workflow, per-iteration training losses)."""
    return train_in_process(
        CONFIG, dataset_dir, output_dir,
        preset="tiny", dpsr_res=SIZE + 2 * MARGIN, margin=MARGIN, surface_points=8000, **override,
    )


def test_short_run_augments_validates_and_saves(dataset_dir, tmp_path):
    workflow, losses = train(
        dataset_dir, tmp_path, max_epochs=2, batch_size=2, num_points=1000, jitter_sigma=0.5, drop_fraction=0.1,
        ckpt_interval=2,
    )
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == len(losses) == 4  # 5 training skulls, batch 2, drop_last
    points = trainer.state.batch["points"]
    assert points.shape == (2, 900, 3)  # 10 % of the points dropped
    assert 0 <= points.min() and points.max() < 1  # unit cube of the padded volume
    assert trainer.state.batch["indicator"].shape == (2, 64, 64, 64)

    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert 0 <= evaluator.state.metrics["val_dice"] <= 1
    ckpt = tmp_path / "checkpoints"
    assert {p.name for p in ckpt.iterdir()} == {
        "checkpoint_iteration=2.pt", "checkpoint_iteration=4.pt", "final.pt", "best_network.pt"
    }
    state = torch.load(ckpt / "final.pt", weights_only=False)
    assert set(state) == {"network", "optimizer", "lr_scheduler", "trainer"}
    assert state["trainer"]["iteration"] == 4
    assert list(tmp_path.glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_trained_voxelizer_reconstructs_held_out_skull(dataset_dir, tmp_path):
    """Dice > 0.9 at 64^3 for a skull the voxelizer never saw.

    The tiny preset's 8^3 feature grid stalls near Dice 0.7 on these 2-voxel-thin shells; a 32^3 grid
    (the paper's) with 4,096 points gets past 0.9 in ~400 iterations (docs/history/training_notebook.md); 600 iterations
    reached 0.918 here (lr 0.004 is worse: 0.894 at 500).
    """
    workflow, losses = train(
        dataset_dir, tmp_path, **{"network_def#grid_res": 32}, num_points=4096, jitter_sigma=0.0,
        drop_fraction=0.0, batch_size=2, learning_rate=0.002, epoch_length=100, max_epochs=6, val_interval=1,
        ckpt_interval=10_000,
    )
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:50])
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    print(f"held-out val_dice: best {evaluator.state.best_metric:.4f} at epoch {evaluator.state.best_metric_epoch}")
    assert evaluator.state.best_metric > 0.9

    # independent check of best_network.pt: held-out skull file -> padded 64^3 mask, same points as validation
    held_out = build_datalist("skullbreak", dataset_dir)["test"][0]["complete"]
    truth = pad_to_cube(load_mask(held_out), SIZE + 2 * MARGIN)[0] > 0
    workflow.parser.get_parsed_content("validate#preprocessing").set_random_state(seed=0)
    item = workflow.parser.get_parsed_content("validate#dataset")[0]
    network = load_weights(SAPVoxelizer("tiny", dpsr_res=64, grid_res=32), tmp_path / "checkpoints" / "best_network.pt")
    with torch.no_grad():
        pred = network.eval()(item["points"][None])["indicator"][0] <= 0
    dice = DiceMetric()(pred[None, None].float(), truth[None, None].float()).item()
    assert dice == pytest.approx(evaluator.state.best_metric, abs=1e-4)
