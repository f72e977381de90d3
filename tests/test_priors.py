"""Anatomical priors (scripts/priors.py): merging an estimate into a sample on constructed point sets, ray
measurements on a constructed shell, the mirror and shell estimates on synthetic skulls, and
:class:`AnatomicalPriors`, which holds the switches and the tuned numbers and returns each case's priors."""

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt
from scipy.spatial import cKDTree

from scripts.data.points import mask_to_surface_points, normalization_params
from scripts.data.synthetic import skullbreak_case
from scripts.metrics import dice
from scripts.priors import AnatomicalPriors, CasePriors, SkullRays, merge_prior_points, radial_bone, sphere_directions

PRIORS = AnatomicalPriors()  # the defaults: configs/inference.json's priors


@pytest.fixture(scope="module")
def case():
    return skullbreak_case(0, size=64)


def _cap(direction, radius, n, rng, spread=0.1):
    """n points at ``radius`` around unit ``direction`` (angular spread ~``spread`` rad)."""
    d = np.asarray(direction, float) / np.linalg.norm(direction) + rng.normal(0.0, spread, (n, 3))
    return radius * d / np.linalg.norm(d, axis=1, keepdims=True)


def test_merge_replaces_only_the_directions_the_estimate_covers():
    rng = np.random.default_rng(0)
    left, top = _cap([1, 0, 0], 50.0, 100, rng), _cap([0, 0, 1], 50.0, 100, rng)
    generated = np.concatenate([left, top])
    # the mirror's missing bone on the left, 3 voxels further out than the sample, plus asymmetry far away
    mirror_left, elsewhere = _cap([1, 0, 0], 53.0, 300, rng), _cap([0, -1, 0], 50.0, 50, rng)
    merged, fraction = PRIORS.merge_estimate(generated, np.concatenate([mirror_left, elsewhere]), np.zeros(3),
                                             np.random.default_rng(1))
    assert merged.shape == generated.shape
    radius = np.linalg.norm(merged, axis=1)
    from_mirror = np.isclose(radius, 53.0)
    assert 0.4 < fraction == from_mirror.mean() <= 0.5  # the left cap (its ragged edge may stay)
    assert (merged[from_mirror, 0] > 30.0).all()  # only left points came from the mirror, none from elsewhere
    assert np.isin(top, merged).all(axis=1).all()  # the top cap, which the mirror does not cover, is kept


def test_merge_keeps_the_sample_when_the_estimate_covers_little():
    rng = np.random.default_rng(0)
    generated = _cap([0, 0, 1], 50.0, 200, rng)
    sliver = _cap([0.35, 0, 1], 50.0, 3, rng, spread=0.01)
    merged, fraction = PRIORS.merge_estimate(generated, sliver, np.zeros(3), rng)
    assert fraction == 0.0 and merged is generated
    merged, fraction = PRIORS.merge_estimate(generated, np.empty((0, 3)), np.zeros(3), rng)
    assert fraction == 0.0 and merged is generated


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
    rays = PRIORS.rays(defective, normalization_params(mask_to_surface_points(defective, 3000))[0])
    estimate = rays.points(rays.shell_estimate(truth))
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
    assert AnatomicalPriors(near_rad=0.05).rays(defective, centre).shell_estimate(vault) is None


def _near_truth(points, implant, voxels):
    """Fraction of ``points`` within ``voxels`` of the true implant mask."""
    index = np.clip(np.round(points).astype(int), 0, np.array(implant.shape) - 1)
    return (distance_transform_edt(~implant)[tuple(index.T)] <= voxels).mean()


def test_the_mirror_estimate_lies_on_the_bone_a_one_sided_defect_removed(case):
    """Parietotemporal: the mirrored bone in the hole, anchored to the bone around it, lies on the true
    implant and covers it. Without a mirror transform there is no mirror estimate; for a bilateral
    defect the mirror image is the same hole, so it has little to show."""
    defective, implant = case.defect("parietotemporal")
    truth = mask_to_surface_points(implant, 1000)
    centre = normalization_params(mask_to_surface_points(defective, 3000))[0]
    rays = PRIORS.rays(defective, centre, PRIORS.mirror_transform(defective))
    estimate = rays.points(rays.mirror_estimate(truth))
    assert len(estimate) > 300 and _near_truth(estimate, implant, 1.5) > 0.9
    assert np.median(cKDTree(estimate).query(truth)[0]) < 1.5
    assert PRIORS.rays(defective, centre).mirror_estimate(truth) is None
    bilateral, hole = case.defect("bilateral")
    rays = PRIORS.rays(bilateral, centre, PRIORS.mirror_transform(bilateral))
    assert len(rays.points(rays.mirror_estimate(mask_to_surface_points(hole, 1000)))) < 0.2 * len(estimate)


def test_the_mirror_estimate_meets_the_rim_of_the_hole_where_the_skull_is_asymmetric(case):
    """Move the skull's mirror image 2 voxels outwards (as a skull bulging more on its intact side would):
    the raw mirrored bone then sits off the hole's rim, but the offset measured on the bone around the
    hole pulls the estimate back onto the true implant."""
    defective, implant = case.defect("parietotemporal")
    truth = mask_to_surface_points(implant, 1000)
    centre = normalization_params(mask_to_surface_points(defective, 3000))[0]
    rays = PRIORS.rays(defective, centre, PRIORS.mirror_transform(defective))
    hit, outer, inner = rays.mirror
    rays.mirror = (hit, outer + 2.0, inner + 2.0)
    shifted = rays.points(rays.mirror_estimate(truth))
    assert _near_truth(shifted, implant, 1.5) > 0.9


@pytest.mark.parametrize("kind, prior, min_dice", [("bilateral", "shell", 0.85), ("parietotemporal", "mirror", 0.7)])
def test_the_estimate_as_voxels_is_the_true_implant(case, kind, prior, min_dice):
    """Given the true implant's directions, the prior's bone as voxels overlaps the true implant (the
    64^3 implants are 2-3 voxels thick), lies inside the cone it speaks for and off the skull's bone."""
    defective, implant = case.defect(kind)
    centre = normalization_params(mask_to_surface_points(defective, 3000))[0]
    rays = PRIORS.rays(defective, centre, PRIORS.mirror_transform(defective))
    estimate = getattr(rays, f"{prior}_estimate")(mask_to_surface_points(implant, 1000))
    bone, cone, probability = rays.fill(estimate, defective.shape)
    assert probability is None
    assert dice(bone, implant) > min_dice
    assert not (bone & ~cone).any() and not (bone & defective).any()
    assert (implant & cone).sum() > 0.9 * implant.sum()


def test_the_fill_stops_short_of_a_natural_opening_the_hole_runs_into():
    """A shell between radii 20 and 25 with a defect on its side (directions with x > 0.6, z > -0.45) that
    runs into a wide opening at its bottom (z < -0.4, like the skull base or an orbit). The sample's points
    cover the defect, so the hole (open rays within ``near_rad`` of them) reaches into the opening: the fill
    puts bone in the defect but not in the opening, which it closes with the rule off (``min_opening``
    larger than the sphere)."""
    grid = np.stack(np.meshgrid(*[np.arange(64)] * 3, indexing="ij"), axis=-1) - 31.5
    radius = np.linalg.norm(grid, axis=-1)
    x, z = grid[..., 0] / np.maximum(radius, 1e-9), grid[..., 2] / np.maximum(radius, 1e-9)
    vault = (radius >= 20) & (radius <= 25)
    defect, opening = vault & (x > 0.6) & (z > -0.45), vault & (z < -0.4)
    skull = vault & ~defect & ~opening
    centre = np.full(3, 31.5)
    rays = PRIORS.rays(skull, centre)
    estimate = rays.shell_estimate(np.argwhere(defect & (radius > 24)).astype(float))
    assert rays.directions[estimate.hole][:, 2].min() < -0.5  # the hole reaches into the opening
    bone = rays.fill(estimate, skull.shape)[0]
    assert dice(bone & (z > -0.2), defect & (z > -0.2)) > 0.7  # the defect away from the opening
    assert (bone & opening).sum() <= 5
    closing = AnatomicalPriors(min_opening=20.0).rays(skull, centre).fill(estimate, skull.shape)[0]
    assert (closing & opening).sum() > 200


def test_an_opening_open_on_both_sides_is_cleared_from_the_implant():
    """A shell between radii 20 and 25 with two orbits mirror images of each other (x is the left-right
    axis) and a one-sided defect next to the right orbit. The sample's points cover the defect and spill
    into the right orbit: the orbit is open on both sides and the sample has no points at its mirror image,
    so its voxels are cleared from the implant while the defect's (bone in the mirror image) stay. A defect
    across the midline is its own mirror image and the sample covers it: nothing of it is cleared, and
    without a mirror transform nothing is."""
    grid = np.stack(np.meshgrid(*[np.arange(64)] * 3, indexing="ij"), axis=-1) - 31.5
    radius = np.linalg.norm(grid, axis=-1)
    unit = grid / np.maximum(radius, 1e-9)[..., None]
    vault = (radius >= 20) & (radius <= 25)

    def cap(direction, chord):
        direction = np.asarray(direction, float) / np.linalg.norm(direction)
        return vault & (np.linalg.norm(unit - direction, axis=-1) < chord)

    right, left = cap([0.4, 0.9, -0.2], 0.3), cap([-0.4, 0.9, -0.2], 0.3)
    defect, midline = cap([0.75, 0.6, 0.2], 0.35) & ~right, cap([0.0, 0.3, 0.95], 0.4)
    centre = np.full(3, 31.5)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = 63.0  # voxel i -> 63 - i: the exact mirror image of this grid
    assert defect.sum() > 500 and right.sum() > 500

    skull = vault & ~right & ~left & ~defect
    spilled = np.argwhere((defect | right) & (radius > 24)).astype(float)
    rays = PRIORS.rays(skull, centre, flip)
    cleared = rays.clear_openings(defect | right, spilled)
    assert (cleared & right).sum() < 0.15 * right.sum()  # what is left: rim voxels whose ray grazes bone
    assert not (cleared & cap([0.4, 0.9, -0.2], 0.2)).any()
    assert (cleared & defect).sum() > 0.95 * defect.sum()
    assert not PRIORS.rays(skull, centre).mirrored_openings(spilled).any()

    skull = vault & ~right & ~left & ~midline
    rays = PRIORS.rays(skull, centre, flip)
    on_midline = np.argwhere(midline & (radius > 24)).astype(float)
    assert rays.clear_openings(midline, on_midline).sum() > 0.99 * midline.sum()


def _clouds(case, num_condition=500):
    """Two members of a parietotemporal case, (2, num_condition + 300, 3): the skull's points, then implant
    points on the true implant (member 0) and on intact bone of the upper skull far from the defect (member 1)."""
    defective, implant = case.defect("parietotemporal")
    skull = mask_to_surface_points(defective, 3000)
    centre = normalization_params(skull)[0]
    directions = (skull - centre) / np.linalg.norm(skull - centre, axis=1, keepdims=True)
    implant_dirs = np.argwhere(implant) - centre
    away = cKDTree(implant_dirs / np.linalg.norm(implant_dirs, axis=1, keepdims=True)).query(directions)[0]
    vault = skull[(away > 0.6) & (directions[:, 2] > 0.3)]
    assert len(vault) >= 300
    members = [mask_to_surface_points(implant, 300), vault[:300]]
    return defective, implant, np.stack([np.concatenate([skull[:num_condition], m]) for m in members])


def test_the_estimate_lies_within_near_rad_of_the_sample(case):
    """``near_rad`` is one number: the hole is the open rays within it of the sample's implant directions, so
    the merge's test against the same number keeps every point of the estimate (the merge's own 0.15 of
    0.10.0 never acted)."""
    defective, implant = case.defect("parietotemporal")
    truth = mask_to_surface_points(implant, 1000)
    centre = normalization_params(mask_to_surface_points(defective, 3000))[0]
    rays = PRIORS.rays(defective, centre, PRIORS.mirror_transform(defective))
    for estimate in (rays.mirror_estimate(truth), rays.shell_estimate(truth)):
        points = rays.points(estimate)
        to_sample = cKDTree((truth - centre) / np.linalg.norm(truth - centre, axis=1, keepdims=True)).query(
            (points - centre) / np.linalg.norm(points - centre, axis=1, keepdims=True))[0]
        assert len(points) > 300 and to_sample.max() <= PRIORS.near_rad


def test_merge_returns_each_member_s_prior_and_keeps_no_state(case):
    """:meth:`AnatomicalPriors.merge` returns the merged clouds and the case's :class:`CasePriors`: the
    member on the defect takes the mirror (most of its points), the one on intact bone none (its points
    stay); the skull's points never change; the same call gives the same; without a changed member the
    clouds come back as they are; without the mirror the shell takes the defect."""
    defective, _, clouds = _clouds(case)
    merged, priors = PRIORS.merge(defective, clouds, 500, seed=0)
    assert isinstance(priors, CasePriors) and priors.names == ["mirror", "none"]
    assert priors.fractions[0] > 0.5 and priors.fractions[1] == 0.0
    assert priors.estimates[0].hole.sum() > 100 and priors.estimates[1] is None
    assert len(priors.rays.directions) == PRIORS.num_directions
    np.testing.assert_array_equal(merged[:, :500], clouds[:, :500])
    np.testing.assert_array_equal(merged[1], clouds[1])
    assert not np.array_equal(merged[0], clouds[0])
    again, repeated = PRIORS.merge(defective, clouds, 500, seed=0)
    np.testing.assert_array_equal(again, merged)
    assert (repeated.names, repeated.fractions) == (priors.names, priors.fractions)
    intact = clouds[1:]
    assert PRIORS.merge(defective, intact, 500)[0] is intact
    assert AnatomicalPriors(mirror=False).merge(defective, clouds, 500)[1].names == ["shell", "none"]


def test_voxels_put_the_prior_s_bone_into_the_members_it_filled(case):
    """:meth:`AnatomicalPriors.voxels`: the member whose prior gave most of its points gets the prior's
    bone in its implant and complete skull, the other keeps its (empty) implant; with neither the fill nor
    the mirrored openings nothing changes (None), and the summary's keys come from the priors."""
    defective, implant, clouds = _clouds(case)
    merged, priors = PRIORS.merge(defective, clouds, 500)
    completes, implants = np.stack([defective, defective]), np.zeros((2, *defective.shape), bool)
    filled_completes, filled, probabilities = AnatomicalPriors(surface_sd=0.0).voxels(
        priors, defective, merged[:, 500:], completes, implants)
    assert probabilities is None  # surface_sd 0: the members' 0 / 1 vote
    assert dice(filled[0], implant) > 0.6 and not filled[1].any()
    assert not (filled[0] & defective).any() and (filled_completes[0] >= filled[0]).all()
    assert not implants.any()  # the inputs are not changed in place
    assert AnatomicalPriors(fill=False, mirrored_openings=False).voxels(priors, defective, merged[:, 500:],
                                                                         completes, implants) is None
    # no member fills above a fraction of 1; the mirrored openings still run (and find nothing to clear)
    assert not AnatomicalPriors(fill_above=1.01).voxels(priors, defective, merged[:, 500:], completes, implants)[1].any()
    assert PRIORS.settings(priors) == {"mirror_prior": True, "shell_prior": True, "prior": ["mirror", "none"],
                                       "prior_fraction": [round(priors.fractions[0], 3), 0.0], "prior_fill": True,
                                       "mirrored_openings": True}
    off = AnatomicalPriors(mirror=False, shell=False).settings(None)
    assert off["prior"] == [] and off["prior_fraction"] == [] and off["mirrored_openings"] is False


def test_an_ensemble_s_probability_of_bone_is_soft_only_at_the_prior_s_surfaces(case):
    """With ``surface_sd`` each member's probability of bone in the cone its prior fills falls off across the
    bone's outer and inner surfaces: about 1 in the middle of the shell, 0 far off it, in between at the surfaces,
    and it rounds to the member's own voxels (the masks and their vote do not change); elsewhere it is the
    member's 0 or 1. As ``surface_sd`` goes to 0 it is the prior's bone as voxels."""
    defective, implant, clouds = _clouds(case)
    merged, priors = PRIORS.merge(defective, clouds, 500)
    completes, implants = np.stack([defective, defective]), np.zeros((2, *defective.shape), bool)
    hard = AnatomicalPriors(surface_sd=0.0).voxels(priors, defective, merged[:, 500:], completes, implants)
    soft = PRIORS.voxels(priors, defective, merged[:, 500:], completes, implants)
    np.testing.assert_array_equal(soft[0], hard[0])
    np.testing.assert_array_equal(soft[1], hard[1])
    probabilities = soft[2]
    assert probabilities.dtype == np.float32 and probabilities.min() >= 0 and probabilities.max() <= 1
    assert not probabilities[1].any()  # the member without a prior: its (empty) implant
    assert not probabilities[0][defective].any()
    between = (probabilities[0] > 0.05) & (probabilities[0] < 0.95)
    assert between.sum() > 0.3 * hard[1][0].sum()  # the surfaces of a 2-3 voxel shell
    assert dice(probabilities[0] >= 0.5, hard[1][0]) > 0.8
    estimate = priors.estimates[0]
    bone, _, _ = priors.rays.fill(estimate, defective.shape)
    np.testing.assert_array_equal(priors.rays.fill(estimate, defective.shape, 1e-6)[2] > 0.5, bone)


def test_the_numbers_have_one_home():
    """The ray and merge functions take no tuned defaults of their own: every number comes from
    :class:`AnatomicalPriors` (0.10.0 had two near_rad, 0.15 in the merge and 0.1 in the rays)."""
    with pytest.raises(TypeError):
        SkullRays(np.ones((4, 4, 4), bool), np.full(3, 1.5))
    with pytest.raises(TypeError):
        merge_prior_points(np.ones((3, 3)), np.ones((3, 3)), np.zeros(3), np.random.default_rng(0))
