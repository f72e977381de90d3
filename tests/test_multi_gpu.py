"""torchrun + DistributedDataParallel runs of both trainers on CPU (gloo), two processes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.data.synthetic import generate_skullbreak
from scripts.distributed import init_distributed
from scripts.weights import load_weights
from scripts.networks.pvcnn2 import PVCNN2Denoiser
from scripts.networks.sap import SAPVoxelizer

ROOT = Path(__file__).resolve().parents[1]
# written by every rank after training: a hash of its (unwrapped) weights, one file per rank (printing
# them instead let the two processes' lines interleave on the shared stdout, so a line could be lost)
HASH_EXPR = (
    "$pathlib.Path(@output_dir, f'weights_rank{torch.distributed.get_rank()}.sha256').write_text("
    "hashlib.sha256(b''.join(p.detach().cpu().numpy().tobytes() "
    "for p in scripts.distributed.unwrap(@network).parameters())).hexdigest())"
)


def weights_hash(network: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in network.parameters())).hexdigest()


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """Five 40^3 skulls, one defect class: 4 train, 1 test."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_skullbreak(root, num_cases=5, size=40, seed=0, defects="bilateral")
    return root


def torchrun(name: str, dataset_dir, out: Path, *args: str) -> str:
    """Run train_base.json + train_<name>.json + multi_gpu_train.json on 2 CPU processes; returns the combined log."""
    check = out.parent / f"hash_{name}.json"  # test-only override: write the weight hashes, then finalize as usual
    finalize = json.loads((ROOT / "configs" / "multi_gpu_train.json").read_text())["finalize"]
    check.write_text(json.dumps({"+imports": ["$import hashlib", "$import pathlib"], "finalize": [HASH_EXPR, *finalize]}))
    configs = f"['configs/train_base.json','configs/train_{name}.json','configs/multi_gpu_train.json','{check}']"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "monai.bundle", "run", "--config_file", configs, "--dataset_dir", str(dataset_dir),
        "--output_dir", str(out), "--preset", "tiny", "--batch_size", "1", "--max_epochs", "2",
        "--ckpt_interval", "2", "--val_interval", "1", "--num_val_cases", "1", "--log_interval", "1", *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-4000:]
    return run.stdout


def check_run(log: str, out: Path, network: torch.nn.Module, metric: str) -> None:
    """Both ranks end with identical weights, equal to rank 0's final checkpoint; only rank 0 saves/logs."""
    hashes = {p.stem.removeprefix("weights_rank"): p.read_text() for p in out.glob("weights_rank*.sha256")}
    assert set(hashes) == {"0", "1"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes.values())
    assert hashes["0"] == hashes["1"]
    assert weights_hash(load_weights(network, out / "checkpoints" / "final.pt")) == hashes["0"]
    # 4 training cases on 2 ranks, batch 1 -> 2 iterations per epoch, 4 in all: one checkpoint per interval
    assert log.count("Saved checkpoint at iteration: 2") == 1
    assert log.count("Saved checkpoint at iteration: 4") == 1
    assert len(re.findall(r"Epoch: \d/2, Iter: \d/2 -- train_loss", log)) == 4  # rank 0 logs only
    assert len(re.findall(rf"Epoch\[\d\] Metrics -- {metric}", log)) == 2  # validated every epoch, logged once
    assert {p.name for p in (out / "checkpoints").iterdir()} >= {"final.pt", "best_network.pt"}


def test_init_distributed_outside_torchrun_names_the_launcher(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_distributed()


@pytest.mark.slow
def test_diffusion_ddp_gloo(dataset_dir, tmp_path):
    log = torchrun("diffusion", dataset_dir, tmp_path / "diffusion", "--surface_points", "2000", "--val_steps", "5",
                   "--use_ema", "True")
    check_run(log, tmp_path / "diffusion", PVCNN2Denoiser(preset="tiny"), "val_chamfer")
    state = torch.load(tmp_path / "diffusion" / "checkpoints" / "final.pt", weights_only=False)
    assert "ema_network" in state


@pytest.mark.slow
def test_voxelizer_ddp_gloo(dataset_dir, tmp_path):
    log = torchrun("voxelizer", dataset_dir, tmp_path / "voxelizer", "--surface_points", "4000", "--drop_fraction", "0.1")
    check_run(log, tmp_path / "voxelizer", SAPVoxelizer(preset="tiny"), "val_dice")
