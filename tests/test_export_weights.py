"""tools.export_weights: training checkpoint -> weights file with its recipe, which load_weights and the
inference config accept and MONAI's own loaders read with ``key_in_ckpt="network"``."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import load

from scripts.networks.pvcnn2 import PRESETS, PVCNN2Denoiser
from scripts.weights import load_weights, read_recipe, save_weights
from scripts.weights import export_weights

ROOT = Path(__file__).resolve().parents[1]
RECIPE = [str(ROOT / "configs" / f) for f in ("train_base.json", "train_diffusion.json", "recipes/denoiser_small.json")]


def test_exported_ema_weights_load_into_the_network(tmp_path):
    torch.manual_seed(0)
    net, ema = PVCNN2Denoiser("tiny"), PVCNN2Denoiser("tiny")
    ckpt = tmp_path / "final.pt"
    torch.save({"network": net.state_dict(), "ema_network": ema.state_dict(), "trainer": {"iteration": 7}}, ckpt)
    overlay = tmp_path / "tiny.json"  # the denoiser recipe at the tiny preset, as a further overlay
    overlay.write_text(json.dumps({"preset": "tiny", "recipe#name": "denoiser_tiny"}))
    out = export_weights(ckpt, tmp_path / "models" / "model.pt", [*RECIPE, str(overlay)], key="ema_network")
    loaded = load_weights(PVCNN2Denoiser("tiny"), out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.state_dict().items())
    assert not all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())
    stored = torch.load(out, weights_only=True)  # plain types only: MONAI's loaders use weights_only=True
    assert set(stored) == {"network", "recipe"} and set(stored["network"]) == set(ema.state_dict())
    assert read_recipe(out) == {"name": "denoiser_tiny", "preset": "tiny", "prediction_type": "sample",
                                "clip_x0": 4.0, "num_points": PRESETS["tiny"]["num_points"],
                                "num_condition": PRESETS["tiny"]["num_condition"],
                                "bundle_version": json.loads((ROOT / "configs" / "metadata.json").read_text())["version"]}

    with pytest.raises(FileExistsError, match="model.pt"):
        export_weights(ckpt, out, RECIPE)
    with pytest.raises(KeyError, match=r"final.pt: no state dict under 'ema' \(has \['ema_network', 'network', 'trainer'\]\)"):
        export_weights(ckpt, tmp_path / "x.pt", RECIPE, key="ema")
    with pytest.raises(KeyError, match="no 'recipe' entry"):
        export_weights(ckpt, tmp_path / "y.pt", str(ROOT / "configs" / "evaluate.json"))


def test_a_weights_file_without_recipe_is_refused_when_a_recipe_is_asked_for(tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save(PVCNN2Denoiser("tiny").state_dict(), bare)
    load_weights(PVCNN2Denoiser("tiny"), bare)  # warm starts and checkpoints need no recipe
    with pytest.raises(ValueError, match=r"bare.pt: the file carries no training recipe.*tools.export_weights"):
        load_weights(PVCNN2Denoiser("tiny"), bare, recipe={"preset": "tiny"})


def test_a_cut_short_or_foreign_weights_file_is_named_in_the_error(tmp_path):
    good = tmp_path / "good.pt"
    save_weights(good, PVCNN2Denoiser("tiny").state_dict(), {"preset": "tiny"})
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pt"
    text.write_text("not weights")
    for bad in (cut, text):
        with pytest.raises(ValueError, match=rf"{bad.name}: cannot read the weights file \(corrupt or not a torch file\)"):
            load_weights(PVCNN2Denoiser("tiny"), bad)
    with pytest.raises(FileNotFoundError, match="weights file not found: .*missing.pt"):
        load_weights(PVCNN2Denoiser("tiny"), tmp_path / "missing.pt")


def test_monai_bundle_load_reads_the_shipped_weights(tmp_path):
    """``monai.bundle.load`` of a local bundle copy: models/model.pt into the inference config's
    network_def, with key_in_ckpt="network" (the command docs/README.md gives)."""
    bundle = tmp_path / "cranial_implant_pcdiff"
    for part in ("configs", "models", "scripts"):
        shutil.copytree(ROOT / part, bundle / part)
    net = load(name="cranial_implant_pcdiff", bundle_dir=str(tmp_path), source="github", workflow_type="inference",
               key_in_ckpt="network", device="cpu")
    assert isinstance(net, PVCNN2Denoiser)
    shipped = torch.load(ROOT / "models" / "model.pt", weights_only=True)["network"]
    assert all(torch.equal(net.state_dict()[k], v) for k, v in shipped.items())
