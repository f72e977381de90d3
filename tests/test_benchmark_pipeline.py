"""tools/benchmark_pipeline.py times the bundle's own generator: the shipped preset with the shipped weights."""

from pathlib import Path

from tools.benchmark_pipeline import _one

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_setting_is_timed_stage_by_stage():
    row = _one("small_mirror", str(ROOT / "sample" / "defective_skull.nrrd"), "ddim", 2, 2, 1, 0,
               str(ROOT / "models" / "model.pt"), str(ROOT / "models" / "model_voxelizer.pt"))
    stages = ("load_s", "diffusion_s", "priors_s", "voxelization_s", "postprocessing_s")
    assert row["num_samples"] == 2 and all(row[k] > 0 for k in stages)  # the priors ran, as in inference.json
    assert row["total_s"] >= sum(row[k] for k in stages) - 0.05 and row["peak_rss_gib"] > 0
