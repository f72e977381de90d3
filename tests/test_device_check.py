"""tools/device_check.py: the CPU dry run at tiny sizes (so the prepared GPU run never rots) and its
section bookkeeping."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools import device_check

ROOT = Path(__file__).resolve().parents[1]
OPS = {"furthest_point_sample", "ball_query", "group", "three_nn indices", "three_nn distances",
       "three_nn_interpolate", "normalize_voxel_coords", "avg_voxelize", "trilinear_devoxelize"}
STAGES = ("diffusion", "voxelization", "postprocessing")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, Path]:
    out, cache = tmp_path_factory.mktemp("device_check"), tmp_path_factory.mktemp("cache") / "conditions.npz"
    cmd = [sys.executable, "-m", "tools.device_check", "--device", "cpu", "--tiny", "--out", str(out),
           "--cache", str(cache)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "device_check.json").read_text()), out


@pytest.mark.slow
def test_dry_run_report(dry_run):
    report, out = dry_run
    # nothing else in $OUT: the device machine returns at most 8 files from it
    assert sorted(p.name for p in out.iterdir()) == ["device_check.json", "device_check.log"]
    assert "section train: ok" in (out / "device_check.log").read_text()
    assert report["environment"]["profile"] == "tiny" and report["environment"]["device"] == "cpu"
    sections = report["sections"]
    assert list(sections) == list(device_check.SECTIONS)
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(device_check.SECTIONS, "ok")
    assert all(s["wall_s"] > 0 for s in sections.values())


@pytest.mark.slow
def test_dry_run_correctness(dry_run):
    """On the CPU the ops' torch path (the one CUDA takes) must equal their KD-tree / numpy path exactly."""
    sections = dry_run[0]["sections"]
    assert {row["check"] for row in sections["ops"]["rows"]} == OPS
    assert [row["preset"] for row in sections["pvcnn2"]["rows"]] == ["tiny", "small"]
    assert len(sections["dpsr"]["rows"]) == 2 and len(sections["ddim"]["rows"]) == 1
    for name in ("ops", "pvcnn2", "dpsr", "ddim"):
        for row in sections[name]["rows"]:
            assert row["metric"] in ("rel_l2", "mismatch_fraction") and row["tolerance"] >= 0
            assert row["passed"] and row["value"] == 0.0, row


@pytest.mark.slow
def test_dry_run_bundle_cost_train(dry_run):
    report = dry_run[0]
    run, compare = report["sections"]["bundle"]["rows"]
    assert run["device"] == "cpu" and run["implant_voxels"] > 0 and 0 < run["dsc_to_truth"] <= 1
    assert set(run["timings_s"]) == {"frame", *STAGES, "priors", "total"}  # the priors are on by default
    assert compare["passed"] and compare["dice_device_vs_cpu"] == 1.0

    cost = report["sections"]["cost"]["rows"]
    assert [(r["sampler"], r["members"]) for r in cost] == [("ddim", 1), ("ddim", 2), ("dpmpp_2m", 1), ("dpmpp_2m", 2)]
    for row in cost:
        for stage in STAGES:
            assert row[f"{stage}_s"] > 0 and row[f"{stage}_host_peak_gib"] > 0 and row[f"{stage}_gpu_peak_gib"] is None
        assert row["total_s"] == pytest.approx(sum(row[f"{stage}_s"] for stage in STAGES), abs=2e-3)
    assert set(report["targets"]) == {"ddim-2", "dpmpp_2m-2"}
    one, two = cost[0]["total_s"], cost[1]["total_s"]
    assert report["targets"]["ddim-2"]["ensemble_2_over_one"] == round(two / one, 2)

    (train,) = report["sections"]["train"]["rows"]
    assert train["backend"] == "gloo" and train["world_size"] == 1 and train["loss_finite"]
    assert train["it_s"] == pytest.approx(train["iterations"] / train["train_s"], rel=1e-2)


def test_missing_module_skips_section(monkeypatch):
    monkeypatch.setitem(device_check.NEEDS, "dpsr", ("no_such_module_here",))
    assert device_check.run_section("dpsr", {}) == {"status": "skipped", "reason": "not installed: no_such_module_here"}


def test_failing_section_is_reported(monkeypatch):
    def broken(params, **context):
        raise RuntimeError("boom")

    monkeypatch.setitem(device_check.CHECKS, "dpsr", broken)
    result = device_check.run_section("dpsr", {})
    assert result["status"] == "failed" and result["error"] == "RuntimeError: boom"
