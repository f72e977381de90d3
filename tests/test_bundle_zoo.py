"""Model Zoo readiness: large_files.yml checksums, MONAI's offline bundle checks (verify_net_in_out,
ckpt_export) and a zipped copy of the bundle that loads with monai.bundle.ConfigWorkflow.

What can and cannot be exported, and why: docs/bundle_checks.md.
"""

import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from monai.apps.utils import check_hash
from monai.bundle import ckpt_export, verify_net_in_out
from monai.data import load_net_with_metadata

from scripts.data.synthetic import generate_skullbreak
from scripts.weights import load_weights
from tools.large_files import read_manifest, refresh
from tools.release import MAX_MB, release
from scripts.networks.pvcnn2 import PVCNN2Denoiser
from scripts.networks.sap import SAPIndicator

ROOT = Path(__file__).resolve().parents[1]
META = ROOT / "configs" / "metadata.json"
INFER = ROOT / "configs" / "inference.json"
WEIGHTS = {"network_def": ROOT / "models" / "model.pt", "voxelizer_def": ROOT / "models" / "model_voxelizer.pt"}
PRESET = json.loads(INFER.read_text())["preset"]  # the shipped denoiser's preset


# ----------------------------------------------------------------------------- large_files.yml
def test_large_files_hashes_match_the_shipped_weights():
    """Every manifest entry names an existing file whose real sha256 is the recorded one
    (after new weights: ``python -m tools.large_files``)."""
    _, entries = read_manifest(ROOT / "large_files.yml")
    assert {e["path"] for e in entries} == {"models/model.pt", "models/model_voxelizer.pt",
                                            *(p.relative_to(ROOT).as_posix() for p in (ROOT / "checkpoints").rglob("*.pt"))}
    for entry in entries:
        assert set(entry) == {"path", "url", "hash_val", "hash_type"}
        assert entry["hash_type"] == "sha256" and entry["url"].startswith("https://")
        assert check_hash(ROOT / entry["path"], entry["hash_val"], entry["hash_type"]), entry["path"]


def test_refresh_rewrites_hashes_and_keeps_the_header(tmp_path):
    shutil.copy(ROOT / "large_files.yml", tmp_path)
    for entry in read_manifest(ROOT / "large_files.yml")[1]:
        (tmp_path / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / entry["path"]).write_text(entry["path"])
    refresh(tmp_path)
    header, entries = read_manifest(tmp_path / "large_files.yml")
    assert header == read_manifest(ROOT / "large_files.yml")[0] and header.startswith("# MONAI Model Zoo")
    for entry in entries:
        assert entry["hash_val"] == hashlib.sha256(entry["path"].encode()).hexdigest()
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
    net = load_weights(PVCNN2Denoiser(PRESET), WEIGHTS["network_def"]).eval()
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
    """The release zip unzipped elsewhere; in a fresh process that imports `scripts` from the unzipped copy,
    ConfigWorkflow parses inference.json and loads the shipped weights, and both networks give the outputs
    of the source tree's networks."""
    shutil.unpack_archive(release(tmp_path), tmp_path / "unzipped")
    bundle = tmp_path / "unzipped" / "cranial_implant_pcdiff"

    _, entries = read_manifest(bundle / "large_files.yml")
    shipped = [e for e in entries if not e["path"].startswith("checkpoints/")]  # the checkpoints stay out
    assert all(check_hash(bundle / e["path"], e["hash_val"], e["hash_type"]) for e in shipped)
    run = subprocess.run([sys.executable, "-c", _LOAD_UNZIPPED], cwd=bundle, capture_output=True, text=True,
                         timeout=600, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(info["scripts"]).resolve().is_relative_to(bundle.resolve())
    assert info["version"] == json.loads(META.read_text())["version"]

    outputs = torch.load(bundle / "outputs.pt")
    pts = torch.rand(1, 3, 3072, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = load_weights(PVCNN2Denoiser(PRESET), WEIGHTS["network_def"]).eval()(pts, torch.tensor([10]))
        ind = load_weights(SAPIndicator("small"), WEIGHTS["voxelizer_def"]).eval()(pts)
    assert outputs["eps"].shape == (1, 3, 3072) and outputs["indicator"].shape == (1, 1, 64, 64, 64)
    torch.testing.assert_close(outputs["eps"], eps)
    torch.testing.assert_close(outputs["indicator"], ind)


# ----------------------------------------------------------------------------- from another folder
def _bundle_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <args>`` in ``cwd`` (not the bundle), with nothing of the bundle on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def skulls(tmp_path_factory):
    """Four 40^3 synthetic skulls with a bilateral defect (3 train, 1 test)."""
    root = tmp_path_factory.mktemp("skulls")
    generate_skullbreak(root, num_cases=4, size=40, seed=0, defects="bilateral")
    return root


def test_no_config_resolves_anything_before_run():
    """MONAI puts the bundle root on sys.path in ``run``, after ``initialize``; anything resolved earlier would
    import ``scripts`` from the working folder and fail from any other one. So no config has an initialize step."""
    for config in sorted((ROOT / "configs").rglob("*.json")):
        text = config.read_text()
        assert '"initialize' not in text, config


@pytest.mark.slow
def test_inference_runs_from_another_folder(tmp_path):
    run = _bundle_cli("run", "inference", "--config_file", str(INFER), "--bundle_root", str(ROOT),
                      "--output_dir", str(tmp_path / "out"), "--steps", "2", "--stl", "false", "--preview", "false",
                      "--progress", "false", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "out" / "defective_skull" / "implant.nrrd").is_file()


def test_one_training_iteration_runs_from_another_folder(skulls, tmp_path):
    configs = [str(ROOT / "configs" / c) for c in ("train_base.json", "train_diffusion.json")]
    run = _bundle_cli("run", "--config_file", json.dumps(configs), "--bundle_root", str(ROOT),
                      "--dataset_dir", str(skulls), "--output_dir", str(tmp_path / "run"), "--preset", "tiny",
                      "--surface_points", "2000", "--batch_size", "2", "--max_epochs", "1", "--epoch_length", "1",
                      "--val_interval", "100", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=False)["trainer"]["iteration"] == 1


def test_evaluation_runs_from_another_folder(skulls, tmp_path):
    """The ground-truth implants as predictions: DSC 1 on every case."""
    for implant in (skulls / "SkullBreak" / "implant" / "bilateral").glob("*.nrrd"):
        (tmp_path / "preds" / f"bilateral_{implant.stem}").mkdir(parents=True)
        shutil.copy(implant, tmp_path / "preds" / f"bilateral_{implant.stem}" / "implant.nrrd")
    run = _bundle_cli("run", "--config_file", str(ROOT / "configs" / "evaluate.json"), "--bundle_root", str(ROOT),
                      "--dataset_dir", str(skulls), "--predictions_dir", str(tmp_path / "preds"), "--split", "all",
                      "--output_dir", str(tmp_path / "eval"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["num_cases"] == 4 and all(case["dsc"] == 1.0 for case in report["cases"])


def test_verify_metadata_and_ckpt_export_run_from_another_folder(tmp_path):
    schema = ROOT / "configs" / "schema" / "meta_schema_20240725.json"
    run = _bundle_cli("verify_metadata", "--meta_file", str(META), "--filepath", str(schema), "--hash_type", "sha256",
                      "--hash_val", hashlib.sha256(schema.read_bytes()).hexdigest(), cwd=tmp_path)
    assert run.returncode == 0 and "metadata is verified with no error" in run.stdout + run.stderr, run.stderr[-3000:]
    run = _bundle_cli("ckpt_export", "voxelizer_def", "--filepath", str(tmp_path / "voxelizer.ts"),
                      "--ckpt_file", str(WEIGHTS["voxelizer_def"]), "--key_in_ckpt", "network", "--meta_file", str(META),
                      "--config_file", str(INFER), "--bundle_root", str(ROOT), "--use_trace", "True",
                      "--input_shape", "[1, 3, 3072]", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert load_net_with_metadata(str(tmp_path / "voxelizer.ts"))[1]["version"] == json.loads(META.read_text())["version"]


LOAD = """
import sys, torch
from monai.bundle import load
net = load(name="cranial_implant_pcdiff", bundle_dir=sys.argv[1], workflow_type="inference", key_in_ckpt="network",
           device="cpu", args_file=sys.argv[2])
torch.save(net.state_dict(), "state.pt")
print(type(net).__name__)
"""


def load_from_another_folder(bundle_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``monai.bundle.load`` of ``bundle_dir/cranial_implant_pcdiff`` in a process working in ``cwd``, the bundle root
    given in an args file (load passes no bundle_root of its own); the network's state dict goes to cwd/state.pt."""
    args = cwd / "load_args.json"
    args.write_text(json.dumps({"bundle_root": str(bundle_dir / "cranial_implant_pcdiff")}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", LOAD, str(bundle_dir), str(args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})


def test_monai_bundle_load_from_another_folder(tmp_path):
    (tmp_path / "bundles").mkdir()
    (tmp_path / "bundles" / "cranial_implant_pcdiff").symlink_to(ROOT)
    run = load_from_another_folder(tmp_path / "bundles", tmp_path)
    assert run.returncode == 0 and run.stdout.split()[-1] == "PVCNN2Denoiser", run.stderr[-3000:]
    shipped = torch.load(WEIGHTS["network_def"], weights_only=True)["network"]
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert loaded.keys() == shipped.keys() and all(torch.equal(loaded[k], v) for k, v in shipped.items())


def test_missing_named_dataset_fails_in_one_line_with_the_command_that_makes_it(tmp_path):
    """The shipped denoiser's one-command training on a fresh clone: no data/synth128_wide -> one line naming the
    folder and the generator command that makes it (168 skulls at 128^3 take too long to make unasked)."""
    missing = tmp_path / "data" / "synth128_wide"
    run = _bundle_cli("run", "--config_file", str(ROOT / "configs" / "train_denoiser_mirror.json"), "--bundle_root",
                      str(ROOT), "--dataset_dir", str(missing), "--output_dir", str(tmp_path / "run"), cwd=tmp_path)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    command = (f"cd {ROOT} && python -m scripts.data.synthetic skullbreak --root {missing} "
               "--num_cases 168 --size 128 --seed 0 --head_scale '[0.8,1.05]' --head_stretch 0.1")
    assert run.stderr.strip().splitlines()[-1] == (
        f"ERROR: {missing}: dataset root folder not found; make it with `{command}`")


def test_paper_preset_without_paper_weights_fails_in_one_line(tmp_path):
    """--preset paper with the shipped (small_mirror) weights, and with a paper weights file that is not there: one
    line naming the file, saying the shipped denoiser is the small_mirror preset, and the command that trains paper
    weights."""
    hint = ("the shipped weights are the 'small_mirror' preset, no 'paper' weights ship: train them with `python -m monai.bundle"
            " run --config_file \"['configs/train_base.json','configs/train_diffusion.json']\" --preset paper")
    for extra, problem in [([], f"ERROR: {WEIGHTS['network_def']}: recipe mismatch for 'preset'"),
                           (["--denoiser_weights", str(tmp_path / "paper.pt")],
                            f"ERROR: weights file not found: {tmp_path / 'paper.pt'}")]:
        run = _bundle_cli("run", "--config_file", str(INFER), "--bundle_root", str(ROOT), "--preset", "paper",
                          "--output_dir", str(tmp_path / "out"), *extra, cwd=tmp_path)
        last = run.stderr.strip().splitlines()[-1]
        assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
        assert last.startswith(problem) and hint in last, last


# ----------------------------------------------------------------------------- release zip
def test_release_zip_is_zoo_shaped(tmp_path):
    """One folder with the Zoo parts and the sample, no tests / tools / checkpoints, within MAX_MB; large_files.yml
    names every checkpoint it leaves out with its SHA-256."""
    archive = release(tmp_path)
    version = json.loads(META.read_text())["version"]
    assert archive == tmp_path / f"cranial_implant_pcdiff_v{version}.zip"
    assert archive.stat().st_size <= MAX_MB * 2**20
    names = zipfile.ZipFile(archive).namelist()
    assert {n.split("/")[0] for n in names} == {"cranial_implant_pcdiff"}
    top = {n.split("/")[1] for n in names}
    assert top == {"configs", "models", "scripts", "docs", "sample", "LICENSE", "large_files.yml"}
    assert {"configs/inference.json", "configs/metadata.json", "models/model.pt", "models/model_voxelizer.pt",
            "sample/defective_skull.nrrd", "docs/README.md"} <= {n.partition("/")[2] for n in names}
    assert not any("__pycache__" in n for n in names)
    manifest = {e["path"]: e for e in read_manifest(ROOT / "large_files.yml")[1]}
    for checkpoint in (ROOT / "checkpoints").rglob("*.pt"):
        entry = manifest[checkpoint.relative_to(ROOT).as_posix()]
        assert entry["hash_type"] == "sha256" and check_hash(checkpoint, entry["hash_val"], "sha256")
    with pytest.raises(FileExistsError, match=archive.name):
        release(tmp_path)


@contextlib.contextmanager
def _served(folder: Path):
    """Python's http.server on 127.0.0.1 (a free port) serving ``folder`` in a thread; yields the base URL."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()


@pytest.mark.slow
def test_release_zip_downloads_runs_inference_and_loads_from_another_folder(tmp_path):
    """As a Zoo user: `monai.bundle download --url` of the served release zip, inference on its sample from
    another folder, and monai.bundle.load gives the denoiser with the shipped weights."""
    archive = release(tmp_path / "release")
    bundles = tmp_path / "bundles"
    with _served(archive.parent) as url:
        run = _bundle_cli("download", "--name", "cranial_implant_pcdiff", "--url", f"{url}/{archive.name}",
                          "--bundle_dir", str(bundles), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    bundle = bundles / "cranial_implant_pcdiff"
    assert not (bundle / "tests").exists() and (bundle / "configs" / "inference.json").is_file()

    work = tmp_path / "work"
    work.mkdir()
    run = _bundle_cli("run", "inference", "--config_file", str(bundle / "configs" / "inference.json"),
                      "--bundle_root", str(bundle), "--steps", "2", "--stl", "false", "--preview", "false",
                      "--progress", "false", cwd=work)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((bundle / "outputs" / "defective_skull" / "summary.json").read_text())
    assert summary["implant_voxels"] > 0

    run = load_from_another_folder(bundles, work)
    assert run.returncode == 0 and run.stdout.split()[-1] == "PVCNN2Denoiser", run.stderr[-3000:]
    shipped = torch.load(WEIGHTS["network_def"], weights_only=True)["network"]
    loaded = torch.load(work / "state.pt", weights_only=True)
    assert loaded.keys() == shipped.keys() and all(torch.equal(loaded[k], v) for k, v in shipped.items())


@pytest.mark.parametrize("configs", [["train_base.json", "train_diffusion.json"], ["evaluate.json"]])
def test_training_and_evaluation_errors_are_one_line(configs, tmp_path):
    """A missing dataset folder (not one of the named synthetic sets) ends the job with one line naming it."""
    run = _bundle_cli("run", "--config_file", json.dumps([str(ROOT / "configs" / c) for c in configs]),
                      "--bundle_root", str(ROOT), "--dataset_dir", str(tmp_path / "nowhere"),
                      "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1] == f"ERROR: {tmp_path / 'nowhere'}: dataset root folder not found"
