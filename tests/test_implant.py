"""Implant post-processing and ensemble statistics on small synthetic volumes with known answers."""

import numpy as np
import pytest
import torch

from scripts.implant import (
    BALL3,
    binary_close,
    binary_open,
    clean_implant,
    combine_completes,
    complete_from_indicator,
    ensemble_mean_and_variance,
    fill_holes,
    implant_from_complete,
    keep_near_points,
    largest_component,
    majority_vote,
    median_smooth,
    open_fraction,
    postprocess_ensemble,
    postprocess_member,
    raw_implant,
    require_implant,
    require_opening,
    RequireImplantd,
)

N = 32


def box(lo, hi, n=N):
    """Bool (n, n, n) with [lo, hi) filled along every axis (lo/hi: int or 3-tuple)."""
    m = np.zeros((n, n, n), bool)
    lo, hi = np.broadcast_to(lo, 3), np.broadcast_to(hi, 3)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def shell_case(n=48, r_in=13.0, r_out=19.0):
    """(signed distance of a spherical shell (X, Y, Z) float32, shell mask, cap mask = the 'defect')."""
    g = np.indices((n, n, n), dtype=np.float64) - (n - 1) / 2
    r = np.sqrt((g**2).sum(0))
    sdf = (np.abs(r - (r_in + r_out) / 2) - (r_out - r_in) / 2).astype(np.float32)  # <= 0 inside
    shell = sdf <= 0
    cap = shell & (g[2] > 9) & (np.abs(g[0]) < 8)
    return sdf, shell, cap


def dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_complete_from_indicator_threshold_and_dilation():
    ind = np.ones((9, 9, 9), np.float32)
    ind[4, 4, 4] = 0.0  # exactly 0 is inside
    ind[0, 0, 0] = -2.0
    assert np.array_equal(complete_from_indicator(ind, dilate=0), ind <= 0)
    out = complete_from_indicator(ind, dilate=1)
    # one dilation of a single voxel is the 18-neighbourhood ball around it
    assert np.array_equal(out[3:6, 3:6, 3:6], BALL3)
    # the corner voxel grows into its in-volume face and edge neighbours, not the diagonal one
    corner = np.ones((2, 2, 2), bool)
    corner[1, 1, 1] = False
    assert np.array_equal(out[:2, :2, :2], corner)
    assert out.sum() == BALL3.sum() + corner.sum()
    assert complete_from_indicator(torch.from_numpy(ind)[None], dilate=2).sum() > out.sum()
    with pytest.raises(ValueError, match="indicator: expected a float"):
        complete_from_indicator(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="indicator: expected an"):
        complete_from_indicator(np.zeros((4, 4), np.float32))


def test_raw_implant_is_the_cut_out():
    _, shell, cap = shell_case()
    defective = (shell & ~cap).astype(np.uint8)
    assert np.array_equal(raw_implant(shell, defective), cap)
    with pytest.raises(ValueError, match="differ in shape"):
        raw_implant(shell, defective[:-1])


def test_keep_near_points_matches_brute_force():
    rng = np.random.default_rng(0)
    mask = rng.random((16, 16, 16)) < 0.3
    points = rng.uniform(0, 15, size=(5, 3))
    out = keep_near_points(mask, points, 4.0)
    idx = np.argwhere(mask)
    d = np.linalg.norm(idx[:, None, :] - points[None], axis=-1).min(1)
    expected = np.zeros_like(mask)
    expected[tuple(idx[d <= 4.0].T)] = True
    assert np.array_equal(out, expected)
    assert 0 < out.sum() < mask.sum()
    # a voxel exactly at the threshold distance is kept
    one = np.zeros((8, 8, 8), bool)
    one[0, 0, 3] = True
    assert keep_near_points(one, [[0.0, 0.0, 0.0]], 3.0)[0, 0, 3]
    assert not keep_near_points(one, [[0.0, 0.0, 0.0]], 2.9).any()
    with pytest.raises(ValueError, match="points_vox"):
        keep_near_points(mask, np.zeros((0, 3)), 4.0)
    with pytest.raises(ValueError, match="max_distance_vox"):
        keep_near_points(mask, points, 0.0)


def test_binary_open_removes_spur():
    cube = box(8, 16)
    spur = box((16, 11, 11), (20, 12, 12))  # 1-voxel-thin rod sticking out of a face
    out = binary_open(cube | spur)
    assert not (out & spur).any()
    # the cube survives except its 8 corner voxels, which the corner-less BALL3 cannot reach
    corners = np.zeros_like(cube)
    corners[np.ix_([8, 15], [8, 15], [8, 15])] = True
    assert np.array_equal(out, cube & ~corners)
    assert np.array_equal(binary_open(cube | spur, iterations=0), cube | spur)


def test_largest_component_drops_small_blob_and_uses_26_connectivity():
    big, small = box(4, 12), box(20, 23)
    assert np.array_equal(largest_component(big | small), big)
    diagonal = np.zeros_like(big)
    diagonal[12, 12, 12] = True  # touches big only at a corner
    assert np.array_equal(largest_component(big | diagonal), big | diagonal)
    assert not largest_component(np.zeros_like(big)).any()


def test_median_removes_salt_and_pepper():
    cube = box(8, 24)
    noisy = cube.copy()
    salt = [(2, 2, 2), (28, 5, 17), (4, 26, 9)]
    pepper = [(12, 12, 12), (16, 19, 20)]
    for v in salt:
        noisy[v] = True
    for v in pepper:
        noisy[v] = False
    out = median_smooth(noisy, 3)
    assert not any(out[v] for v in salt)
    assert all(out[v] for v in pepper)
    # faces stay, only edges/corners of the cube (minority neighbourhoods) are rounded off
    assert out[9:23, 9:23, 9:23].all() and not (out & ~cube).any()
    with pytest.raises(ValueError, match="odd"):
        median_smooth(cube, 2)


def test_binary_close_bridges_gap_and_keeps_border():
    left, right = box((4, 8, 8), (15, 20, 20)), box((16, 8, 8), (27, 20, 20))
    gap = box((15, 10, 10), (16, 18, 18))  # interior of the 1-voxel slit between the two blocks
    out = binary_close(left | right)
    assert out[gap].all() and (out >= (left | right)).all()
    slab = box((0, 0, 0), (N, N, 5))  # touches five volume faces: closing must not erode it
    assert np.array_equal(binary_close(slab), slab)


def test_fill_holes_fills_enclosed_cavity():
    solid, cavity = box(6, 20), box(10, 14)
    out = fill_holes(solid & ~cavity)
    assert np.array_equal(out, solid)
    cup = solid & ~box((10, 10, 10), (14, 14, 20))  # cavity open to the outside is not a hole
    assert np.array_equal(fill_holes(cup), cup)


def _reference_chain(m):
    """The clean-up on the full volume, step by step, to check clean_implant's cropping is exact."""
    return largest_component(fill_holes(binary_close(median_smooth(largest_component(binary_open(m))))))


def test_clean_implant_cleans_and_equals_full_volume_chain():
    rng = np.random.default_rng(1)
    plate = box((6, 6, 9), (26, 26, 19))
    dirty = plate & ~box((12, 12, 13), (15, 15, 15))  # enclosed cavity, walls 4 voxels thick
    dirty |= box((26, 15, 12), (30, 16, 13))  # spur
    dirty |= box((1, 1, 24), (4, 4, 27))  # separate blob
    dirty |= (rng.random(plate.shape) < 0.002) & ~box(4, 28)  # salt near the border
    out = clean_implant(dirty)
    assert np.array_equal(out, _reference_chain(dirty))
    # spur, blob and salt are gone, the cavity is filled; only the plate's edges get rounded
    assert not (out & ~plate).any() and out[7:25, 7:25, 10:18].all() and dice(out, plate) > 0.95
    touching = box((0, 0, 0), (N, 10, 8))  # crop reaching the volume border
    assert np.array_equal(clean_implant(touching), _reference_chain(touching))
    assert not clean_implant(np.zeros_like(plate)).any()
    skipped = clean_implant(dirty, opening=0, median=1, closing=0)
    assert np.array_equal(skipped, largest_component(fill_holes(largest_component(dirty))))


def test_postprocess_member_recovers_the_defect():
    sdf, shell, cap = shell_case()
    defective = shell & ~cap
    exact = postprocess_member(sdf, defective, dilate=0)
    assert dice(exact, cap) > 0.95 and not (exact & defective).any()
    dilated = postprocess_member(sdf, defective)  # reference: one dilation thickens the implant
    assert dice(dilated, cap) > 0.8 and dilated.sum() > exact.sum() and not (dilated & defective).any()
    # stray completion far from the generated implant points is dropped by the distance filter
    stray = sdf.copy()
    stray[2:8, 2:8, 2:8] = -1.0
    points = np.argwhere(cap)[::7].astype(np.float32) + 0.25
    near = postprocess_member(stray, defective, points, dilate=0, max_distance_vox=4.0, opening=0, median=1, closing=0)
    assert not near[:10, :10, :10].any() and dice(near, cap) > 0.95
    assert np.array_equal(implant_from_complete(sdf <= 0, defective), exact)


def test_postprocess_ensemble_members_mean_and_uncertainty():
    sdf, shell, cap = shell_case()
    defective = shell & ~cap
    indicators = np.stack([sdf, sdf - 0.6, sdf + 0.6])  # thicker / thinner completions
    points = np.stack([np.argwhere(cap)[k::9].astype(np.float32) for k in range(3)])
    out = postprocess_ensemble(indicators, defective, points, dilate=0, max_distance_vox=6.0)
    for k in range(3):
        assert np.array_equal(out["implants"][k], postprocess_member(indicators[k], defective, points[k], dilate=0,
                                                                      max_distance_vox=6.0))
    assert np.array_equal(out["completes"], indicators <= 0)
    # the ensemble implant: vote on the complete skulls (the median member here), then subtract and clean
    assert np.array_equal(out["implant_mean"], implant_from_complete(sdf <= 0, defective, points.reshape(-1, 3), 6.0))
    votes = out["implants"].sum(0)
    assert np.allclose(out["probability"], votes / 3) and np.allclose(out["variance"], votes / 3 * (1 - votes / 3))
    assert dice(out["implant_mean"], cap) > 0.95 and out["variance"][cap].max() > 0  # members disagree at the rim
    single = postprocess_ensemble(indicators[:1], defective, points[:1], dilate=0, max_distance_vox=6.0)
    assert np.array_equal(single["implant_mean"], out["implants"][0]) and single["variance"] is None


def test_majority_vote_odd_even_and_inputs():
    a, b, c, d = (np.zeros((2, 2, 2), bool) for _ in range(4))
    a[0, 0, 0] = b[0, 0, 0] = True  # 2 votes
    c[1, 1, 1] = True  # 1 vote
    assert np.array_equal(majority_vote([a, b, c]), a)  # 2 of 3 wins, 1 of 3 loses
    assert np.array_equal(majority_vote(np.stack([a, b, c, d])), a)  # 2 of 4 is a tie -> foreground
    assert not majority_vote([a, c, d, d]).any()  # 1 of 4 loses
    assert np.array_equal(majority_vote([c]), c)
    assert np.array_equal(combine_completes([torch.from_numpy(a), b, c]), a)
    with pytest.raises(ValueError, match="masks"):
        majority_vote([])


def test_ensemble_mean_and_variance():
    rng = np.random.default_rng(2)
    stack = rng.random((5, 6, 7, 8)) < 0.5
    mean, prob, var = ensemble_mean_and_variance(stack)
    assert prob.dtype == var.dtype == np.float32 and mean.dtype == bool
    np.testing.assert_allclose(prob, stack.mean(0), atol=1e-6)
    np.testing.assert_allclose(var, stack.astype(np.float64).var(0), atol=1e-6)
    assert np.array_equal(mean, stack.sum(0) >= 3)
    assert var.max() <= 0.25 and np.array_equal(var == 0, (prob == 0) | (prob == 1))


def test_require_implant():
    m = box(2, 4)
    assert require_implant(m) == 8
    with pytest.raises(ValueError, match="no defect found"):
        require_implant(np.zeros_like(m))
    with pytest.raises(ValueError, match="case_7"):
        require_implant(m, min_voxels=9, name="case_7")


def skull_cap_case(n=64):
    """(defective shell, the cap cut out of it = a filled opening, a layer the cap's size lying 2 voxels
    outside the intact shell on the other side), bool (n, n, n): a skull-like 4-voxel shell of radius 26."""
    g = np.indices((n, n, n)) - (n - 1) / 2
    r = np.sqrt((g**2).sum(0))
    shell = (r >= 24) & (r <= 28)
    cap = shell & (g[2] > np.cos(np.radians(35)) * r)
    layer = (r > 29) & (r <= 31) & (-g[2] > np.cos(np.radians(35)) * r)
    return shell & ~cap, cap, layer


def test_open_fraction_tells_a_filled_opening_from_a_layer_on_intact_bone():
    """The cap put back covers the opening (fraction 0.95, the rest is the rim seen obliquely); a layer
    beside intact bone covers none, at any spacing (the search band is in mm)."""
    defective, cap, layer = skull_cap_case()
    for spacing in [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (1.0, 1.0, 2.0)]:
        assert open_fraction(cap, defective, spacing) > 0.9
        assert open_fraction(layer, defective, spacing) == 0.0
    assert open_fraction(np.zeros_like(cap), defective, (1.0, 1.0, 1.0)) == 0.0
    assert require_opening(cap, defective, (1, 1, 1), name="case_3") > 0.9
    with pytest.raises(ValueError, match=r"case_3: no defect found, only 0 % of the implant lies over an opening"):
        require_opening(layer, defective, (1, 1, 1), name="case_3")


def test_require_implantd_checks_volume_and_opening_in_the_input_spacing():
    from monai.data import MetaTensor

    defective, cap, layer = skull_cap_case()
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    data = {"skull": MetaTensor(torch.from_numpy(defective[None].astype(np.float32)), affine=affine),
            "input": "/data/case_9.nrrd"}
    out = RequireImplantd(min_implant_ml=2.0)({**data, "implant": cap})
    assert out["implant_voxels"] == cap.sum() and out["implant_open_fraction"] > 0.9
    with pytest.raises(ValueError, match=r"case_9.nrrd: no defect found, only 0 %"):
        RequireImplantd(min_implant_ml=2.0)({**data, "implant": layer})
    cap_ml = cap.sum() * 8 / 1000  # 2 mm voxels
    with pytest.raises(ValueError, match=r"case_9.nrrd: no defect found, the implant is empty or too small"):
        RequireImplantd(min_implant_ml=cap_ml + 0.01)({**data, "implant": cap})
    off = RequireImplantd(min_implant_ml=0.0, min_open_fraction=0.0)({**data, "implant": layer})
    assert off["implant_voxels"] == layer.sum() and off["implant_open_fraction"] == 0.0
