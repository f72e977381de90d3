"""The smooth-shell prior (scripts/shell.py) on a constructed shell and on synthetic skulls."""

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt
from scipy.spatial import cKDTree

from scripts.data.points import mask_to_surface_points, normalization_params
from scripts.data.synthetic import skullbreak_case
from scripts.shell import ShellPrior, radial_bone, sphere_directions


@pytest.fixture(scope="module")
def case():
    return skullbreak_case(0, size=64)


def test_sphere_directions_are_unit_vectors_spread_evenly():
    directions = sphere_directions(2000)
    assert np.allclose(np.linalg.norm(directions, axis=1), 1.0)
    assert np.linalg.norm(directions.mean(axis=0)) < 1e-3  # balanced over the sphere
    spacing, _ = cKDTree(directions).query(directions, k=2)
    expected = np.sqrt(4 * np.pi / 2000)  # side of the area each direction owns
    assert 0.7 * expected < spacing[:, 1].min() and spacing[:, 1].max() < 1.3 * expected


def test_radial_bone_measures_a_shell_and_its_hole():
    """A shell between radii 20 and 25 around the grid's centre with the top cap cut away."""
    grid = np.stack(np.meshgrid(*[np.arange(64)] * 3, indexing="ij"), axis=-1) - 31.5
    radius = np.linalg.norm(grid, axis=-1)
    shell = (radius >= 20) & (radius <= 25) & (grid[..., 2] < 15)
    directions = sphere_directions(500)
    hit, outer, inner = radial_bone(shell, np.full(3, 31.5), directions)
    open_top = directions[:, 2] * 20 > 15.5  # the ray leaves the shell above the cut
    assert not hit[open_top].any() and hit[directions[:, 2] < 0.5].all()
    assert np.abs(outer[hit & (directions[:, 2] < 0.5)] - 25).max() <= 1.0
    assert np.abs(inner[hit & (directions[:, 2] < 0.5)] - 20).max() <= 1.0


@pytest.mark.parametrize("kind", ["bilateral", "random_1"])
def test_the_shell_across_the_hole_lies_on_the_missing_bone(case, kind):
    """Given the directions of the true implant, the interpolated outer and inner surfaces lie on the true
    implant and cover it, including the defect across the midline that the mirror cannot fill."""
    defective, implant = case.defect(kind)
    truth = mask_to_surface_points(implant, 1000)
    prior = ShellPrior(defective, normalization_params(mask_to_surface_points(defective, 3000))[0])
    estimate = prior.missing_points(truth)
    assert len(estimate) > 300
    voxels = np.clip(np.round(estimate).astype(int), 0, np.array(implant.shape) - 1)
    assert (distance_transform_edt(~implant)[tuple(voxels.T)] <= 1.5).mean() > 0.9
    covered, _ = cKDTree(estimate).query(truth)
    assert np.median(covered) < 1.5


def test_no_hole_in_the_sample_s_directions_gives_no_points(case):
    """Points on intact bone (the defective skull's own surface, away from any opening) fill nothing."""
    defective, implant = case.defect("bilateral")
    centre = normalization_params(mask_to_surface_points(defective, 3000))[0]
    bone = mask_to_surface_points(defective, 3000)
    directions = (bone - centre) / np.linalg.norm(bone - centre, axis=1, keepdims=True)
    implant_dirs = (np.argwhere(implant) - centre)
    implant_dirs /= np.linalg.norm(implant_dirs, axis=1, keepdims=True)
    away, _ = cKDTree(implant_dirs).query(directions)
    vault = bone[(away > 0.6) & (directions[:, 2] > 0.3)]  # upper skull far from the defect
    assert len(vault) > 50
    assert len(ShellPrior(defective, centre, near_rad=0.05).missing_points(vault)) == 0
