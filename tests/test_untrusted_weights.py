"""Weights and checkpoints are read with ``weights_only=True``: a pickle that would run code is refused,
naming the file, and its payload never runs (scripts/weights.py, scripts/checkpoints.py, tools/learning_curve.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from scripts.checkpoints import latest_checkpoint
from scripts.cli import root_cause
from scripts.networks.sap import SAPIndicator
from scripts.weights import UnsafeFileError, load_weights, read_weights_file
from tools.learning_curve import score

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [ROOT / "models" / "model.pt", ROOT / "models" / "model_voxelizer.pt", *sorted(ROOT.glob("checkpoints/*/final.pt"))]


class _Payload:
    """Unpickling this calls ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def crafted(tmp_path):
    """(a torch file whose pickle creates a marker file when loaded unsafely, the marker's path)."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "model.pt"
    torch.save({"network": _Payload(marker), "trainer": {"iteration": 10, "epoch_length": 1}}, path)
    return path, marker


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_torch_file_loads_weights_only(path):
    assert isinstance(read_weights_file(path, mmap=True), dict)


def test_crafted_weights_are_refused_by_load_weights(crafted):
    path, marker = crafted
    with pytest.raises(UnsafeFileError, match=rf"^{path}: refused: loading it would import posix.system") as err:
        load_weights(SAPIndicator(preset="small"), path)
    assert "\n" not in str(err.value) and not marker.exists()


def test_crafted_weights_are_refused_through_the_inference_config(crafted):
    path, marker = crafted
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT), "denoiser_weights": str(path)})
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("denoiser")
    assert isinstance(root_cause(err.value), UnsafeFileError) and str(path) in str(root_cause(err.value))
    assert not marker.exists()


def test_crafted_weights_end_the_bundle_job_in_one_line(crafted, tmp_path):
    path, marker = crafted
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                          "--denoiser_weights", str(path), "--output_dir", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and run.stderr.strip().splitlines()[-1].startswith(f"ERROR: {path}: refused: ")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_crafted_resume_checkpoint_stops_training(crafted, tmp_path):
    path, marker = crafted
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    path.rename(ckpt_dir / "final.pt")
    with pytest.raises(UnsafeFileError, match=rf"^{ckpt_dir / 'final.pt'}: refused"):
        latest_checkpoint(ckpt_dir)
    assert not marker.exists()


def test_a_crafted_kept_checkpoint_is_refused_by_the_learning_curve(crafted, tmp_path):
    path, marker = crafted
    kept = tmp_path / "run" / "checkpoints" / "kept"
    kept.mkdir(parents=True)
    path.rename(kept / "checkpoint_iteration=600.pt")
    with pytest.raises(UnsafeFileError, match=rf"^{kept / 'checkpoint_iteration=600.pt'}: refused"):
        score(str(tmp_path / "run"), str(tmp_path / "no_dataset"), str(tmp_path / "curve"))
    assert not marker.exists() and not (tmp_path / "curve").exists()
