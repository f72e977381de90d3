"""tools.denoiser_diagnostics on small synthetic skulls with the shipped weights: the per-timestep
errors and the sampled points' distances behave as their definitions require."""

import numpy as np
import pytest

from scripts.data.synthetic import generate_skullbreak
from tools.denoiser_diagnostics import per_timestep, points, trajectory


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """Five 64^3 skulls with a bilateral defect; the test split holds one of them."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_skullbreak(root, num_cases=5, size=64, seed=0, defects="bilateral")
    return root


@pytest.mark.slow
def test_per_timestep_errors_of_the_shipped_denoiser(dataset_dir):
    result = per_timestep(str(dataset_dir), num_cases=1, timesteps=(5, 200, 999))
    network, no_network = np.array([result[t] for t in (5, 200, 999)]).T
    assert np.all(np.diff(no_network) > 0) and no_network[0] < 2.0  # the noise alone grows with t
    assert network[2] < no_network[2] / 10  # from pure noise the network knows where the implant is
    assert np.all(np.isfinite(network)) and np.all(network > 0)


@pytest.mark.slow
def test_points_distances_of_sampled_implant_points(dataset_dir):
    result = points(str(dataset_dir), num_cases=1, num_truth_points=500, steps=4)
    assert 0 < result["median"] <= result["p90"] <= result["max"]
    assert 0 <= result["strays"] <= 1 and 0 < result["coverage_median"] <= result["coverage_p90"]
    assert result["median"] < 10  # the samples land near the defect, not anywhere in the 64^3 cube
    assert result["radial_offset_abs"] == pytest.approx(abs(result["radial_offset"]))  # one case
    assert result["radial_offset_abs"] < 10


@pytest.mark.slow
def test_trajectory_scores_every_sampler_step(dataset_dir):
    result = trajectory(str(dataset_dir), num_cases=1, steps=4)
    assert list(result) == [999, 749, 499, 249]  # DDIM-4, trailing spacing: one row per network call
    radial, chamfer = np.array(list(result.values())).T
    assert np.all(radial >= 0) and np.all(np.isfinite(chamfer))
    assert np.all(chamfer > 0) and chamfer[-1] < 10  # the last estimate lies on the implant, not anywhere in 64^3
