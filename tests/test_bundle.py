"""Bundle-level checks: metadata validates offline against the shipped schema, configs parse, MONAI's
inference properties, one version everywhere."""

import ast
import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml
from monai.bundle import ConfigParser, ConfigWorkflow, verify_metadata

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SCHEMA = CONFIGS / "schema" / "meta_schema_20240725.json"
# SHA-256 of the official file (MONAI-extra-test-data release 0.8.1, the URL in metadata.json["schema"])
SCHEMA_SHA256 = "cd64aa8a5904426f6fc6855dabe46af8c742d5bad644b4e9cfb78ebad09ad678"


def test_verify_metadata_offline():
    """MONAI's verify_metadata uses the shipped schema (no download) and accepts metadata.json; the
    schema is the official file, unmodified, and the one metadata.json names."""
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256
    assert json.loads((CONFIGS / "metadata.json").read_text())["schema"].endswith("/" + SCHEMA.name)
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))


def test_verify_metadata_rejects_incomplete_metadata(tmp_path):
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    del meta["network_data_format"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))


TRAIN_BASE = "train_base.json"
TRAINERS = ["train_diffusion.json", "train_voxelizer.json"]  # layers on TRAIN_BASE
# overlay -> the layers it goes on (after TRAIN_BASE), as users run them
OVERLAYS = {"multi_gpu_train.json": [[trainer] for trainer in TRAINERS],
            "recipes/denoiser_small.json": [["train_diffusion.json"]],
            "recipes/denoiser_small_b16.json": [["train_diffusion.json", "recipes/denoiser_small.json"]],
            "recipes/denoiser_small_decay.json": [["train_diffusion.json", "recipes/denoiser_small.json"]],
            "recipes/denoiser_mirror.json": [["train_diffusion.json", "recipes/denoiser_small.json"]],
            "recipes/voxelizer_small.json": [["train_voxelizer.json"]]}
# the training configs of the shipped weights, by the inference.json recipe they must match
SHIPPED = {"denoiser_recipe": ["train_diffusion.json", "recipes/denoiser_small.json", "recipes/denoiser_mirror.json",
                               "recipes/denoiser_small_b16.json"],
           "voxelizer_recipe": ["train_voxelizer.json", "recipes/voxelizer_small.json"]}
# the shipped denoiser comes from the staged command: its recipe is the last stage's, named after that command
STAGED_NAME = {"denoiser_recipe": json.loads((CONFIGS / "train_denoiser_mirror.json").read_text())["recipe_name"]}
CONFIG_RUNS = [[c] for c in sorted(p.name for p in CONFIGS.glob("*.json")) if c not in [TRAIN_BASE, *TRAINERS, *OVERLAYS]] + [
    [TRAIN_BASE, trainer] for trainer in TRAINERS] + [
    [TRAIN_BASE, *below, overlay] for overlay, stacks in OVERLAYS.items() for below in stacks]


@pytest.mark.parametrize("configs", CONFIG_RUNS, ids="+".join)
def test_config_files_parse(configs):
    """Every bundle config is valid JSON that MONAI's ConfigParser reads; the trainer layers are read on
    the train base, and overlays (multi-GPU, recipes) on top of those, as users run them; an overlay
    changes only keys that are there already (at the top level)."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in configs])
    assert isinstance(parser.get(), dict)
    if len(configs) > 2:
        base = ConfigParser()
        base.read_config([str(CONFIGS / c) for c in configs[:-1]])
        overlay = json.loads((CONFIGS / configs[-1]).read_text())
        assert all(key.split("#")[0] in base.get() for key in overlay), sorted(set(overlay) - set(base.get()))


# Every positional key path (`<list>#<index>`) that a config, a command or a test overrides -> the config
# layer whose list it indexes, and what the indexed item must be there and in every stack on top of that
# layer: a component's `_target_`, or the callable an expression item calls.
POSITIONAL = {
    "surface_transforms#3": ("train_diffusion.json", "scripts.data.points.SurfacePointsd"),
    "validate#handlers#2": (TRAIN_BASE, "CheckpointSaver"),
    "run#1": (TRAIN_BASE, "monai.utils.set_determinism"),
    "run#3": (TRAIN_BASE, "scripts.checkpoints.attach_checkpointing"),
}
# where positional overrides are written: configs, code, tests and the current docs' command lines
OVERRIDE_SOURCES = ["configs/**/*.json", "scripts/**/*.py", "tools/*", "tests/*.py", "deploy/*", "README.md",
                    "docs/*.md"]


def mislanded(configs: list[str], parser: ConfigParser) -> list[str]:
    """The POSITIONAL paths of the layers in ``configs`` whose indexed item in ``parser`` (those configs
    read, unparsed) is not the component or expression named there."""
    wrong = []
    for path, (layer, target) in POSITIONAL.items():
        if layer not in configs:
            continue
        parent, index = path.rsplit("#", 1)
        items = parser.get(parent)
        item = items[int(index)] if isinstance(items, list) and int(index) < len(items) else None
        if not (isinstance(item, dict) and item.get("_target_") == target
                or isinstance(item, str) and item.startswith(f"${target}(")):
            wrong.append(path)
    return wrong


def test_every_positional_override_is_declared():
    """A positional key path used anywhere is in POSITIONAL, so the test below checks where it lands."""
    used = set()
    for pattern in OVERRIDE_SOURCES:
        for file in ROOT.glob(pattern):
            if file.is_file() and file.suffix in {".json", ".py", ".md", ".sh", ".yaml"}:
                for match in re.finditer(r"[A-Za-z_][\w#]*#\d+", file.read_text()):
                    used.add(match.group())
    assert "surface_transforms#3" in used and used <= set(POSITIONAL), sorted(used - set(POSITIONAL))


@pytest.mark.parametrize("configs", [[TRAIN_BASE], *CONFIG_RUNS], ids="+".join)
def test_positional_overrides_land_on_the_item_they_mean(configs):
    """Each config stack (every layer below an override included) has, at each POSITIONAL index, the item
    named there: a list reordered under an override fails here instead of changing another item."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in configs])
    assert mislanded(configs, parser) == []


def test_a_shifted_list_is_reported_as_mislanded():
    configs = [TRAIN_BASE, "train_diffusion.json"]
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in configs])
    parser["surface_transforms"] = [{"_target_": "Identityd", "keys": "defective"}, *parser["surface_transforms"]]
    assert mislanded(configs, parser) == ["surface_transforms#3"]


@pytest.mark.parametrize("trainer", TRAINERS)
def test_trainer_layers_add_to_the_train_base_and_restate_nothing(trainer):
    """A trainer layer holds only what differs from configs/train_base.json: every key it sets that the base
    has gets another value there, and its `+imports` are not imported by the base already."""
    base = json.loads((CONFIGS / TRAIN_BASE).read_text())
    base_parser = ConfigParser(base)
    layer = json.loads((CONFIGS / trainer).read_text())
    assert set(layer.pop("+imports")).isdisjoint(base["imports"])
    restated = [key for key, value in layer.items() if key in base_parser and base_parser[key] == value]
    assert restated == []


def test_overlays_cover_every_config_they_name():
    assert {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.glob("recipes/*.json")} | {"multi_gpu_train.json"} \
        == set(OVERLAYS)


def test_inference_config_has_monai_inference_properties():
    """MONAI's property check of an inference bundle (what the Deploy bundle operator and Zoo tooling use)."""
    workflow = ConfigWorkflow(config_file=str(CONFIGS / "inference.json"), workflow_type="infer",
                              bundle_root=str(ROOT), logging_file=False)
    workflow.initialize()
    assert workflow.check_properties() == []
    assert workflow.parser["run"] == workflow.parser["inference"]  # `run` and `run inference` do the same


def test_shipped_recipes_are_what_inference_expects():
    """The recipe overlays of the shipped weights build the recipes inference.json checks the weights
    against (so training and inference cannot drift apart silently), and the shipped files carry them, with the
    presets that scripts.weights.SHIPPED_PRESETS names in its errors."""
    from scripts.weights import SHIPPED_PRESETS, read_recipe, training_recipe

    infer = ConfigParser()
    infer.read_config(str(CONFIGS / "inference.json"))
    for expected, layers in SHIPPED.items():
        trained = training_recipe([str(CONFIGS / f) for f in (TRAIN_BASE, *layers)])
        wanted = infer.get_parsed_content(expected)
        assert trained["name"] == Path(layers[-1]).stem and {k: trained[k] for k in wanted} == wanted
        shipped = ROOT / "models" / ("model.pt" if expected == "denoiser_recipe" else "model_voxelizer.pt")
        assert read_recipe(shipped) == {**trained, "name": STAGED_NAME.get(expected, trained["name"]),
                                        "bundle_version": read_recipe(shipped)["bundle_version"]}
        assert SHIPPED_PRESETS[layers[0]] == read_recipe(shipped)["preset"]


def test_staged_training_command_ends_with_the_shipped_denoiser_recipe():
    """configs/train_denoiser_mirror.json (all stages in one command): its last stage trains with the
    configs of the shipped denoiser's recipe, so its result passes inference.json's recipe check."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train_denoiser_mirror.json"))
    parser["bundle_root"] = str(ROOT)
    last = [*parser.get_parsed_content("trainer_configs"), *parser.get_parsed_content("stages")[-1]["configs"]]
    assert [Path(c).resolve() for c in last] == [CONFIGS / c for c in (TRAIN_BASE, *SHIPPED["denoiser_recipe"])]


def test_deploy_app_version_is_the_bundle_version():
    """deploy/app.py reads its version from configs/metadata.json (no literal), app.yaml states the same."""
    version = json.loads((CONFIGS / "metadata.json").read_text())["version"]
    app = ast.parse((ROOT / "deploy" / "app.py").read_text())
    cls = next(n for n in app.body if isinstance(n, ast.ClassDef) and n.name == "CranialImplantApp")
    assigned = next(n.value for n in cls.body if isinstance(n, ast.Assign) and n.targets[0].id == "version")
    assert ast.unparse(assigned) == "bundle_version(APP_BUNDLE)"
    assert str(yaml.safe_load((ROOT / "deploy" / "app.yaml").read_text())["application"]["version"]) == version


def test_headline_numbers_are_quoted_from_one_file():
    """metadata.json eval_metrics, README.md and the model card quote docs/headline_metrics.json's numbers
    of the default setting on the test set (tools.quality_study --headline_set writes that file)."""
    study = json.loads((ROOT / "docs" / "headline_metrics.json").read_text())["sets"]["test"]
    metrics = json.loads((CONFIGS / "metadata.json").read_text())["eval_metrics"]
    assert metrics == {"mean_dice": study["dsc"], "mean_boundary_dice_10mm": study["bdsc"], "mean_hd95_mm": study["hd95_mm"]}
    quoted = f"{study['dsc']:.3f} / {study['bdsc']:.3f} / {study['hd95_mm']:.2f}"
    for doc in ("README.md", "docs/README.md"):
        assert quoted in (ROOT / doc).read_text(), doc


def test_the_quality_study_writes_the_default_rows_headline(tmp_path):
    from tools.quality_study import DEFAULT, write_headline

    row = {"setting": DEFAULT, "cases": 20, "dsc": 0.89012, "bdsc": 0.8834, "hd95_mm": 2.0567}
    summaries = [{"weights": {"model.pt": "abc"}}]
    write_headline(tmp_path / "h.json", "study", "data/x", row, summaries, "cmd")
    written = write_headline(tmp_path / "h.json", "other", "data/y", {**row, "cases": 10}, summaries, "cmd2")
    assert written == json.loads((tmp_path / "h.json").read_text())
    assert set(written["sets"]) == {"study", "other"} and written["setting"] == DEFAULT
    assert written["sets"]["study"] == {"dataset_dir": "data/x", "num_cases": 20, "dsc": 0.89, "bdsc": 0.883,
                                        "hd95_mm": 2.06, "weights_sha256": {"model.pt": "abc"}, "command": "cmd"}
    with pytest.raises(ValueError, match="default setting"):
        write_headline(tmp_path / "h.json", "study", "data/x", {**row, "setting": "DDIM-1"}, summaries, "cmd")
