"""Volumetric U-Net baseline: training through configs/train_unet.json (loss, checkpoints, resume) and
inference through configs/inference_unet.json (exact input grid, no overwrite, scorable by evaluate.json)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import MetaTensor
from monai.transforms import LoadImage

from bundle_training import run_with_trainer_hook

from scripts.data.datalist import build_datalist
from scripts.data.synthetic import generate_skullbreak
from scripts.evaluate import case_id, evaluate_predictions
from scripts.io import load_mask, save_mask
from scripts.unet_baseline import unet_cases

pytestmark = pytest.mark.slow  # end to end: generates skulls, trains, predicts, scores (17-35 s on 2 shared cores)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"working_size": 32, "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
EPOCHS = 10  # 4 training cases, batch 2 -> 2 iterations per epoch
read = LoadImage(image_only=True, ensure_channel_first=True)  # no validation: a prediction may be empty


def _workflow(config: str, **overrides) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs" / config),
        meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        bundle_root=str(ROOT),
        **TINY,
        **overrides,
    )
    workflow.initialize()
    return workflow


def _train(data: Path, out: Path, max_epochs: int) -> tuple[list[float], int]:
    """Run the training config; returns (loss per iteration of this run, iteration it started at)."""
    workflow = _workflow(
        "train_unet.json", dataset_dir=str(data), output_dir=str(out), max_epochs=max_epochs,
        val_interval=5, ckpt_interval=10, learning_rate=0.01,
    )
    losses, start = [], []

    def hook(trainer):
        trainer.add_event_handler(Events.STARTED, lambda e: start.append(e.state.iteration))
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))

    run_with_trainer_hook(workflow, hook)
    return losses, start[0]


def _oblique_input(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """A cropped (44, 40, 36) defective skull with an anisotropic, axis-flipped, shifted affine."""
    source = load_mask(data / "SkullBreak" / "defective_skull" / "bilateral" / "002.nrrd")
    affine = np.array([[-0.9, 0, 0, 40.0], [0, 1.1, 0, -20.0], [0, 0, 1.6, 5.0], [0, 0, 0, 1]])
    return np.asarray(source[0, 2:46, 4:44, 6:42]), affine


def _infer(data: Path, out: Path, weights: Path, **overrides) -> None:
    workflow = _workflow("inference_unet.json", dataset_dir=str(data), output_dir=str(out), weights=str(weights),
                         **overrides)
    workflow.run()
    workflow.finalize()



@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unet_data")
    generate_skullbreak(root, num_cases=3, size=48, seed=0, defects=("bilateral", "parietotemporal"))
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("unet_run")
    torch.manual_seed(0)
    losses, start = _train(data, out, EPOCHS)
    return {"out": out, "losses": losses, "start": start}


def test_training_loss_drops_and_checkpoints(trained):
    losses = trained["losses"]
    assert trained["start"] == 0 and len(losses) == 2 * EPOCHS
    assert all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4])
    ckpts = trained["out"] / "checkpoints"
    assert {"best_network.pt", "final.pt", "checkpoint_iteration=20.pt"} <= {p.name for p in ckpts.iterdir()}
    assert list(trained["out"].glob("events.out.tfevents.*"))  # TensorBoard


def test_training_resumes_from_checkpoint(data, trained, tmp_path):
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    final = trained["out"] / "checkpoints" / "final.pt"
    (out / "checkpoints" / "final.pt").write_bytes(final.read_bytes())
    losses, start = _train(data, out, EPOCHS + 2)
    assert start == 2 * EPOCHS and len(losses) == 4  # only the two new epochs ran


def test_inference_datalist_exact_grid_no_overwrite_and_scorable(data, trained, tmp_path):
    out = tmp_path / "predictions"
    weights = trained["out"] / "checkpoints" / "best_network.pt"
    _infer(data, out, weights, input="@datalist")
    test = build_datalist("skullbreak", data)["test"]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["case_id"] for s in summary] == [case_id(e) for e in test]
    for entry, case in zip(test, summary):
        assert set(case["timings_s"]) == {"load", "predict", "postprocess", "save", "total"}
        assert case["working_size"] == [32, 32, 32] and case["weights"]["best_network.pt"]
        implant, defective = read(case["output"]), load_mask(entry["defective"])
        assert implant.shape == defective.shape and int(implant.sum()) == case["implant_voxels"]
        np.testing.assert_allclose(implant.affine, defective.affine)
        assert not ((implant > 0) & (defective > 0)).any()

    written = {p: p.read_bytes() for p in out.glob("*/implant.nrrd")}
    with pytest.raises(RuntimeError) as err:  # the bundle parser wraps the job's exception
        _infer(data, out, weights, input="@datalist")
    assert isinstance(err.value.__cause__, FileExistsError) and "implant.nrrd" in str(err.value.__cause__)
    assert {p: p.read_bytes() for p in out.glob("*/implant.nrrd")} == written

    report = evaluate_predictions(test, out, tmp_path / "eval")
    assert report["num_cases"] == len(test)
    assert 0.0 <= report["metrics"]["dsc"]["mean"] <= 1.0


def test_inference_anisotropic_flipped_input_keeps_its_grid(data, trained, tmp_path):
    """An oblique-grid input given as a folder: the implant lands on its exact grid."""
    crop, affine = _oblique_input(data)
    folder = tmp_path / "inputs"
    save_mask(folder / "patient_a.nrrd", crop, affine)
    out = tmp_path / "predictions"
    _infer(data, out, trained["out"] / "checkpoints" / "final.pt", input=str(folder))
    (case,) = json.loads((out / "summary.json").read_text())
    assert case["case_id"] == "patient_a" and case["shape"] == list(crop.shape)
    implant = read(out / "patient_a" / "implant.nrrd")
    assert implant.shape[1:] == crop.shape and int(implant.sum()) == case["implant_voxels"]
    np.testing.assert_allclose(implant.affine, affine)
    assert not (np.asarray(implant[0] > 0) & (crop > 0)).any()


def test_unet_cases_inputs_and_errors(data, tmp_path):
    test = build_datalist("skullbreak", data)["test"]
    assert unet_cases(test) == [(Path(e["defective"]), case_id(e)) for e in test]
    one = Path(test[0]["defective"])
    assert unet_cases(str(one)) == [(one, "002")]
    with pytest.raises(ValueError, match="same case id"):
        unet_cases([str(one), str(Path(test[1]["defective"]))])  # both are 002.nrrd
    with pytest.raises(ValueError, match="no 'defective'"):
        unet_cases([{"implant": str(one)}])
    with pytest.raises(FileNotFoundError, match="missing.nrrd"):
        unet_cases([{**test[0], "defective": str(tmp_path / "missing.nrrd")}])


def test_inference_transforms_round_trip_an_oblique_grid(data):
    """Config pre/postprocessing alone: the input itself as 'logits' comes back on the input grid."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference_unet.json"))
    parser.update({"working_size": 64})
    preprocessing, postprocessing = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("postprocessing")
    source, affine = _oblique_input(data)
    img = MetaTensor(torch.from_numpy(source)[None], affine=torch.from_numpy(affine))
    d = preprocessing({"image": img})
    assert d["image"].shape == (1, 64, 64, 64)
    d["pred"] = 20.0 * (d["image"] - 0.5)  # "network" = the input, as logits
    back = np.asarray(postprocessing(d)["pred"][0]) > 0
    assert back.shape == source.shape
    assert 2 * (back & (source > 0)).sum() / (back.sum() + source.sum()) > 0.98  # 0.76 with axis 0 flipped
