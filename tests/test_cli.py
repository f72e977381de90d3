"""scripts/cli.py: boolean flags as typed on a command line, one-line error reports."""

import subprocess
import sys

import pytest

from scripts.cli import as_bool, root_cause


@pytest.mark.parametrize("value", [True, 1, "true", "True", "YES", "yes", "on", "On", "1", " true "])
def test_true_words(value):
    assert as_bool(value, "stl") is True


@pytest.mark.parametrize("value", [False, 0, "false", "FALSE", "no", "No", "off", "OFF", "0"])
def test_false_words(value):
    assert as_bool(value, "stl") is False


@pytest.mark.parametrize("value", ["maybe", "", "2", 2, -1, 0.5, None, "tru"])
def test_other_values_are_refused_naming_the_option(value):
    with pytest.raises(ValueError, match=r"--preview: expected true or false .*got"):
        as_bool(value, "preview")


def test_root_cause_skips_wrappers():
    try:
        try:
            raise FileNotFoundError("/data/x.nrrd: file not found")
        except OSError as err:
            raise RuntimeError("Failed to evaluate ConfigExpression") from err
    except RuntimeError as wrapped:
        assert str(root_cause(wrapped)) == "/data/x.nrrd: file not found"


@pytest.mark.parametrize(
    "error, last_line",
    [
        ("ValueError('/data/ct.nrrd: not a binary mask')", "ERROR: /data/ct.nrrd: not a binary mask"),
        ("BatchError('1 of 2 cases failed: /data/a.nrrd: empty mask')", "ERROR: 1 of 2 cases failed: /data/a.nrrd: empty mask"),
        ("KeyError('bug')", "KeyError: 'bug'"),
    ],
)
def test_error_report_ends_on_the_root_cause(error, last_line):
    """A process with the report installed ends on the wrapped error's own message; a programming error
    keeps its traceback (of the root cause only)."""
    code = (
        "from scripts.cli import BatchError, install_error_report\n"
        "install_error_report()\n"
        "try:\n"
        f"    raise {error}\n"
        "except Exception as err:\n"
        "    raise RuntimeError('Failed to evaluate ConfigExpression: ...') from err\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and lines[-1] == last_line
    assert "Failed to evaluate" not in run.stderr
    assert (len(lines) == 1) == error.startswith(("ValueError", "BatchError"))


@pytest.mark.parametrize("value, enabled", [("no", False), ("On", True), ("maybe", None)])
def test_use_ema_in_the_training_config_reads_words(value, enabled):
    from pathlib import Path

    from monai.bundle import ConfigParser

    root = Path(__file__).resolve().parents[1]
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / "train_base.json"), str(root / "configs" / "train_diffusion.json")])
    parser.update({"bundle_root": str(root), "use_ema": value})
    if enabled is None:
        with pytest.raises(RuntimeError) as err:
            parser.get_parsed_content("train#ema")
        assert str(root_cause(err.value)).startswith("--use_ema: expected true or false")
    else:
        assert (parser.get_parsed_content("train#ema") is not None) == enabled
