"""Bundle-level checks: metadata validates offline against the shipped schema, configs parse."""

import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser, verify_metadata

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SCHEMA = CONFIGS / "schema" / "meta_schema.json"


def test_verify_metadata_offline():
    """MONAI's verify_metadata uses the shipped schema (no download) and accepts metadata.json."""
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))


def test_verify_metadata_rejects_incomplete_metadata(tmp_path):
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    del meta["network_data_format"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.json")))
def test_config_files_parse(config):
    """Every bundle config is valid JSON that MONAI's ConfigParser reads; multi_gpu_* override files
    are read merged on top of the config they override, as users run them."""
    files = [CONFIGS / config]
    if config.startswith("multi_gpu_"):
        files.insert(0, CONFIGS / config.removeprefix("multi_gpu_"))
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    assert isinstance(parser.get(), dict)
