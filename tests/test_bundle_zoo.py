"""Model Zoo readiness: large_files.yml checksums, MONAI's offline bundle checks (verify_net_in_out,
ckpt_export) and a zipped copy of the bundle that loads with monai.bundle.ConfigWorkflow.

What can and cannot be exported, and why: docs/bundle_checks.md.
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.apps.utils import check_hash
from monai.bundle import ckpt_export, verify_net_in_out
from monai.data import load_net_with_metadata

from scripts.weights import load_weights
from tools.large_files import read_manifest, refresh
from scripts.networks.pvcnn2 import PVCNN2Denoiser
from scripts.networks.sap import SAPIndicator

ROOT = Path(__file__).resolve().parents[1]
META = ROOT / "configs" / "metadata.json"
INFER = ROOT / "configs" / "inference.json"
WEIGHTS = {"network_def": ROOT / "models" / "model.pt", "voxelizer_def": ROOT / "models" / "model_voxelizer.pt"}
BUNDLE_PARTS = ("configs", "scripts", "models", "docs", "large_files.yml", "LICENSE", "README.md")


# ----------------------------------------------------------------------------- large_files.yml
def test_large_files_hashes_match_the_shipped_weights():
    """Every manifest entry names an existing file whose real sha256 is the recorded one
    (after new weights: ``python -m tools.large_files``)."""
    _, entries = read_manifest(ROOT / "large_files.yml")
    assert {e["path"] for e in entries} == {"models/model.pt", "models/model_voxelizer.pt"}
    for entry in entries:
        assert set(entry) == {"path", "url", "hash_val", "hash_type"}
        assert entry["hash_type"] == "sha256" and entry["url"].startswith("https://")
        assert check_hash(ROOT / entry["path"], entry["hash_val"], entry["hash_type"]), entry["path"]


def test_refresh_rewrites_hashes_and_keeps_the_header(tmp_path):
    shutil.copy(ROOT / "large_files.yml", tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("model.pt", "model_voxelizer.pt"):
        (tmp_path / "models" / name).write_bytes(name.encode())
    refresh(tmp_path)
    header, entries = read_manifest(tmp_path / "large_files.yml")
    assert header == read_manifest(ROOT / "large_files.yml")[0] and header.startswith("# MONAI Model Zoo")
    for entry in entries:
        assert entry["hash_val"] == hashlib.sha256(Path(entry["path"]).name.encode()).hexdigest()
    (tmp_path / "models" / "model_voxelizer.pt").unlink()
    with pytest.raises(FileNotFoundError, match="models/model_voxelizer.pt"):
        refresh(tmp_path)


# ----------------------------------------------------------------------------- verify_net_in_out
def _voxelizer_io() -> dict:
    """Override that points verify_net_in_out (which reads network_data_format) at the voxelizer's format."""
    return {"_meta_#network_data_format": json.loads(META.read_text())["voxelizer_data_format"]}


@pytest.mark.parametrize("net_id", ["network_def", "voxelizer_def"])
def test_verify_net_in_out(net_id):
    """MONAI's check: a random (1, C, *spatial_shape) input of the metadata's dtype gives an output with
    the metadata's channel count and dtype. The denoiser's second input (t) goes in extra_forward_args."""
    kwargs = {"extra_forward_args": {"t": torch.tensor([500])}} if net_id == "network_def" else _voxelizer_io()
    verify_net_in_out(net_id=net_id, meta_file=str(META), config_file=str(INFER), device="cpu",
                      bundle_root=str(ROOT), **kwargs)


def test_verify_net_in_out_catches_a_wrong_channel_count():
    with pytest.raises(ValueError, match="output channel number `3` doesn't match: `4`"):
        verify_net_in_out(net_id="network_def", meta_file=str(META), config_file=str(INFER), device="cpu",
                          extra_forward_args={"t": torch.tensor([1])},
                          **{"_meta_#network_data_format#outputs#pred#num_channels": 4})


# ----------------------------------------------------------------------------- ckpt_export
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_ckpt_export_traced_voxelizer_matches_eager(tmp_path):
    """ckpt_export --use_trace writes a TorchScript voxelizer (with metadata and config inside) that
    equals the eager network on inputs other than the tracing example (other N, batch 2)."""
    out = tmp_path / "model_voxelizer.ts"
    ckpt_export(net_id="voxelizer_def", filepath=str(out), ckpt_file=str(WEIGHTS["voxelizer_def"]),
                key_in_ckpt="network", meta_file=str(META), config_file=str(INFER), use_trace=True,
                input_shape=[1, 3, 3072], bundle_root=str(ROOT))
    ts, meta, extra = load_net_with_metadata(str(out), more_extra_files=["inference.json"])
    assert meta["version"] == json.loads(META.read_text())["version"]
    assert json.loads(extra["inference.json"])["voxelizer_def"]["_target_"] == "scripts.networks.sap.SAPIndicator"
    eager = load_weights(SAPIndicator("small"), WEIGHTS["voxelizer_def"]).eval()
    gen = torch.Generator().manual_seed(0)
    for shape in [(1, 3, 2000), (2, 3, 3072)]:
        x = torch.rand(shape, generator=gen)
        with torch.no_grad():
            expected = eager(x)
            assert expected.shape == (shape[0], 1, 64, 64, 64)
            torch.testing.assert_close(ts(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_denoiser_export_limits_documented_in_bundle_checks_md():
    """docs/bundle_checks.md: the denoiser cannot be scripted, and a trace only replays the example input
    (furthest point sampling / ball query run in numpy / scipy and become constants)."""
    net = load_weights(PVCNN2Denoiser("small"), WEIGHTS["network_def"]).eval()
    with pytest.raises(torch.jit.frontend.UnsupportedNodeError, match="function definitions aren't supported"):
        torch.jit.script(net)
    gen = torch.Generator().manual_seed(0)
    x, other, t = torch.randn(1, 3, 3072, generator=gen), torch.randn(1, 3, 3072, generator=gen), torch.tensor([500])
    with torch.no_grad():
        traced = torch.jit.trace(net, (x, t), check_trace=False)
        torch.testing.assert_close(traced(x, t), net(x, t))
        assert (traced(other, t) - net(other, t)).abs().max() > 0.1


# ----------------------------------------------------------------------------- zipped bundle
_LOAD_UNZIPPED = """
import json, torch
from monai.bundle import ConfigWorkflow
import scripts
wf = ConfigWorkflow(config_file="configs/inference.json", meta_file="configs/metadata.json",
                    workflow_type="infer", bundle_root=".", device="cpu")
wf.initialize()
pts = torch.rand(1, 3, 3072, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    eps = wf.parser.get_parsed_content("denoiser").eval()(pts, torch.tensor([10]))
    ind = wf.parser.get_parsed_content("voxelizer").eval()(pts)
torch.save({"eps": eps, "indicator": ind}, "outputs.pt")
print(json.dumps({"scripts": scripts.__file__, "version": wf.parser.get("_meta_#version")}))
"""


def test_zipped_bundle_loads_with_config_workflow(tmp_path):
    """Copy the bundle's parts, zip, unzip elsewhere; in a fresh process that imports `scripts` from the
    unzipped copy, ConfigWorkflow parses inference.json and loads the shipped weights, and both networks
    give the outputs of the source tree's networks."""
    src = tmp_path / "src" / "cranial_implant_pcdiff"
    for part in BUNDLE_PARTS:
        (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, src / part)
    archive = shutil.make_archive(str(tmp_path / "cranial_implant_pcdiff"), "zip", root_dir=src.parent)
    shutil.unpack_archive(archive, tmp_path / "unzipped")
    bundle = tmp_path / "unzipped" / "cranial_implant_pcdiff"

    _, entries = read_manifest(bundle / "large_files.yml")
    assert all(check_hash(bundle / e["path"], e["hash_val"], e["hash_type"]) for e in entries)
    run = subprocess.run([sys.executable, "-c", _LOAD_UNZIPPED], cwd=bundle, capture_output=True, text=True,
                         timeout=600, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(info["scripts"]).resolve().is_relative_to(bundle.resolve())
    assert info["version"] == json.loads(META.read_text())["version"]

    outputs = torch.load(bundle / "outputs.pt")
    pts = torch.rand(1, 3, 3072, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = load_weights(PVCNN2Denoiser("small"), WEIGHTS["network_def"]).eval()(pts, torch.tensor([10]))
        ind = load_weights(SAPIndicator("small"), WEIGHTS["voxelizer_def"]).eval()(pts)
    assert outputs["eps"].shape == (1, 3, 3072) and outputs["indicator"].shape == (1, 1, 64, 64, 64)
    torch.testing.assert_close(outputs["eps"], eps)
    torch.testing.assert_close(outputs["indicator"], ind)
