"""Weights and checkpoints are read with ``weights_only=True``: a pickle that would run code is refused,
naming the file, and its payload never runs (scripts/weights.py, scripts/checkpoints.py, tools/learning_curve.py);
released weights are checked against the SHA-256 in large_files.yml."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import ConfigParser

from scripts.cases import file_sha256
from scripts.checkpoints import latest_checkpoint
from scripts.cli import root_cause
from scripts.networks.sap import SAPIndicator
from scripts.weights import UnsafeFileError, load_weights, read_weights_file, weights_hash
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


# ----------------------------------------------------------------------------- large_files.yml hashes
def test_large_files_lists_a_sha256_for_every_file_and_the_shipped_weights_match_it():
    entries = yaml.safe_load((ROOT / "large_files.yml").read_text())["large_files"]
    assert entries and all(e["hash_type"] == "sha256" and len(e["hash_val"]) == 64 for e in entries)
    for entry in entries:
        assert weights_hash(ROOT / entry["path"])[1] is True


@pytest.fixture
def altered(tmp_path):
    """(a released voxelizer weights file altered in one value, the manifest listing the original's hash)."""
    (tmp_path / "models").mkdir()
    stored = read_weights_file(ROOT / "models" / "model_voxelizer.pt")
    next(iter(stored["network"].values())).view(-1)[0] += 1e-3
    path = tmp_path / "models" / "model_voxelizer.pt"
    torch.save(stored, path)
    entry = {"path": "models/model_voxelizer.pt", "hash_val": file_sha256(ROOT / "models" / "model_voxelizer.pt"),
             "hash_type": "sha256"}
    (tmp_path / "large_files.yml").write_text(yaml.safe_dump({"large_files": [entry]}))
    return path, tmp_path / "large_files.yml"


def test_an_altered_released_file_loads_with_a_warning(altered, caplog):
    path, manifest = altered
    assert weights_hash(path, manifest)[1] is False
    with caplog.at_level(logging.WARNING, logger="scripts.weights"):
        load_weights(SAPIndicator(preset="small"), path, manifest=manifest)
    assert f"{path}: SHA-256 {file_sha256(path)} differs" in caplog.text


def test_strict_weights_refuses_an_altered_released_file_in_one_line(altered):
    path, manifest = altered
    with pytest.raises(ValueError, match=rf"^{path}: SHA-256 \w+ differs from \w+ listed in .*refused") as err:
        load_weights(SAPIndicator(preset="small"), path, strict_weights=True, manifest=manifest)
    assert "\n" not in str(err.value)


def test_unlisted_weights_load_unverified_without_a_warning(altered, caplog, tmp_path):
    path, manifest = altered
    trained = tmp_path / "runs" / "model_voxelizer.pt"  # same name, not the listed path: a user-trained file
    trained.parent.mkdir()
    path.rename(trained)
    assert weights_hash(trained, manifest)[1:] == (None, "")
    with caplog.at_level(logging.WARNING, logger="scripts.weights"):
        load_weights(SAPIndicator(preset="small"), trained, strict_weights=True, manifest=manifest)
    assert "differs" not in caplog.text


def test_strict_weights_is_a_flag_of_the_inference_config():
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    assert parser["strict_weights"] is False
    parser.update({"bundle_root": str(ROOT), "strict_weights": "maybe"})
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("voxelizer")
    assert str(root_cause(err.value)).startswith("--strict_weights: expected true or false")
