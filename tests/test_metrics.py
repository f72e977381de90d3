"""AutoImplant metrics: analytic cases, brute-force references, empty masks, MONAI / Ignite integration."""

import math

import nrrd
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor, decollate_batch, list_data_collate
from monai.transforms import EnsureChannelFirst, LoadImage
from scipy.ndimage import distance_transform_edt, gaussian_filter
from scipy.spatial.distance import cdist

from scripts.metrics import (
    BoundaryDiceHandler,
    BoundaryDiceMetric,
    HD95Handler,
    HD95Metric,
    ImplantDiceHandler,
    ImplantDiceMetric,
    boundary_dice,
    dice,
    hd95,
    monai_reference_metrics,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*(is all 0|always_return_as_numpy).*")


def cube(shape, lo, size):
    m = np.zeros(shape, bool)
    m[tuple(slice(s, s + size) for s in lo)] = True
    return m


def ball(shape, centre_mm, radius_mm, spacing):
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grid, centre_mm)) <= radius_mm**2


def blob(rng, shape=(24, 20, 16)):
    """Random lumpy mask: thresholded smoothed noise."""
    return gaussian_filter(rng.standard_normal(shape), 2.0) > 0.05


def surface_points_mm(mask, spacing):
    """Independent surface definition: voxels with a 6-neighbour outside the mask (outside the array counts)."""
    p = np.pad(mask, 1)
    inner = p[1:-1, 1:-1, 1:-1]
    neighbours_in = [np.roll(p, s, axis=a)[1:-1, 1:-1, 1:-1] for a in range(3) for s in (1, -1)]
    surface = inner & ~np.logical_and.reduce(neighbours_in)
    return np.argwhere(surface) * np.asarray(spacing, float)


def brute_directed(a, b, spacing):
    """All-pairs distances from each surface voxel of a to the nearest surface voxel of b (mm)."""
    return cdist(surface_points_mm(a, spacing), surface_points_mm(b, spacing)).min(axis=1)


def brute_hd95(a, b, spacing):
    return np.percentile(np.concatenate([brute_directed(a, b, spacing), brute_directed(b, a, spacing)]), 95)


# ---------------------------------------------------------------- DSC
@pytest.mark.parametrize("shift", [(0, 0, 0), (3, 0, 0), (0, 2, 5), (1, 2, 3), (10, 0, 0)])
def test_dice_of_shifted_cubes_matches_overlap_formula(shift):
    L = 10
    a = cube((32, 32, 32), (4, 4, 4), L)
    b = cube((32, 32, 32), tuple(4 + s for s in shift), L)
    expected = math.prod(max(L - s, 0) for s in shift) / L**3  # 2|A&B| / (2 L^3)
    assert dice(a, b) == pytest.approx(expected)
    assert dice(torch.from_numpy(a).float()[None], b.astype(np.uint8)) == pytest.approx(expected)


# ---------------------------------------------------------------- HD95
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.4, 0.4, 0.4), (0.5, 1.0, 2.0), (2.5, 0.3, 0.7)])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_hd95_parallel_plates_is_shift_times_spacing(k, spacing):
    """A 1-voxel-thick plate and its copy k voxels further along x: every surface distance is k * sx."""
    a = np.zeros((20, 16, 16), bool)
    a[4, 2:14, 2:14] = True
    b = np.roll(a, k, axis=0)
    assert hd95(a, b, spacing) == pytest.approx(k * spacing[0])


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.4, 0.5, 1.25)])
@pytest.mark.parametrize("shift", [(2, 0, 0), (1, 3, 0), (4, 1, 2)])
def test_hd95_shifted_cubes_matches_brute_force(shift, spacing):
    a = cube((24, 24, 24), (5, 5, 5), 9)
    b = cube((24, 24, 24), tuple(5 + s for s in shift), 9)
    assert hd95(a, b, spacing) == pytest.approx(brute_hd95(a, b, spacing))


def test_hd95_random_shapes_touching_the_border_match_brute_force():
    rng = np.random.default_rng(0)
    for spacing in [(1.0, 1.0, 1.0), (0.45, 0.45, 1.5)]:
        a, b = blob(rng), blob(rng)
        assert a.any() and b.any() and a[0].any()  # foreground on the array border is surface too
        assert hd95(a, b, spacing) == pytest.approx(brute_hd95(a, b, spacing))


@pytest.mark.parametrize("r1, r2", [(6.0, 9.0), (5.0, 12.0)])
def test_hd95_concentric_balls_is_radius_difference(r1, r2):
    spacing = (1.0, 1.0, 1.0)
    inner, outer = (ball((32, 32, 32), (15.5, 15.5, 15.5), r, spacing) for r in (r1, r2))
    assert abs(hd95(inner, outer, spacing) - (r2 - r1)) <= 1.0


def test_hd95_same_physical_object_at_anisotropic_sampling():
    """Balls of radii 6 and 10 mm sampled at (1,1,1) and at (1,1,2) mm give the same HD95 within a voxel."""
    values = []
    for spacing, shape in [((1.0, 1.0, 1.0), (30, 30, 30)), ((1.0, 1.0, 2.0), (30, 30, 15))]:
        a = ball(shape, (14.0, 14.0, 14.0), 6.0, spacing)
        b = ball(shape, (14.0, 14.0, 14.0), 10.0, spacing)
        values.append(hd95(a, b, spacing))
    assert values[0] == pytest.approx(4.0, abs=1.0)
    assert values[1] == pytest.approx(values[0], abs=1.0)


def test_hd95_scales_with_spacing():
    rng = np.random.default_rng(1)
    a, b = blob(rng), blob(rng)
    base = hd95(a, b, (0.5, 0.8, 1.1))
    assert hd95(a, b, (1.0, 1.6, 2.2)) == pytest.approx(2 * base)


def test_pooled_hd95_differs_from_monai_max_of_directed_percentiles():
    """Big plate vs a small patch of it: one direction is far, the other is 0; MONAI takes the max."""
    a = np.zeros((8, 24, 24), bool)
    a[3, 2:22, 2:22] = True
    b = np.zeros_like(a)
    b[3, 10:14, 10:14] = True
    spacing = (1.0, 0.5, 0.5)
    ours = hd95(a, b, spacing)
    ref = monai_reference_metrics(a, b, spacing)
    directed = [np.percentile(brute_directed(x, y, spacing), 95) for x, y in ((a, b), (b, a))]
    assert ours == pytest.approx(brute_hd95(a, b, spacing))
    assert ref["monai_hd95"] == pytest.approx(max(directed), rel=1e-5)
    assert ours < ref["monai_hd95"]
    assert ref["monai_dice"] == pytest.approx(dice(a, b))


# ---------------------------------------------------------------- bDSC
def full_volume_bdsc(pred, gt, defective, spacing, distance_mm=10.0):
    """Uncropped reference formula: zero both implants where the skull distance exceeds distance_mm."""
    band = distance_transform_edt(~defective, sampling=spacing) <= distance_mm
    inter, total = np.count_nonzero(pred & gt & band), np.count_nonzero(pred & band) + np.count_nonzero(gt & band)
    return 1.0 if total == 0 else 2 * inter / total


def skull_and_implants(spacing=(1.0, 1.0, 1.0)):
    """Skull slab at x < 4; implants are plates at x = 6..8 (within 10 mm of the skull at spacing 1)."""
    skull = np.zeros((48, 24, 24), bool)
    skull[:4] = True
    gt = np.zeros_like(skull)
    gt[6:9, 4:20, 4:20] = True
    pred = np.zeros_like(skull)
    pred[6:9, 6:20, 4:18] = True
    return pred, gt, skull


def test_bdsc_equals_dsc_when_all_disagreement_is_near_the_skull():
    pred, gt, skull = skull_and_implants()
    assert boundary_dice(pred, gt, skull, 1.0) == pytest.approx(dice(pred, gt))


def test_bdsc_ignores_disagreement_far_from_the_skull():
    pred, gt, skull = skull_and_implants()
    near = boundary_dice(pred, gt, skull, 1.0)
    pred_far = pred.copy()
    pred_far[30:40, 5:15, 5:15] = True  # >= 27 mm away from the skull
    assert boundary_dice(pred_far, gt, skull, 1.0) == pytest.approx(near)
    assert dice(pred_far, gt) < dice(pred, gt)
    # the same lump counts once the band is wide enough to reach it
    assert boundary_dice(pred_far, gt, skull, 1.0, distance_mm=40.0) == pytest.approx(dice(pred_far, gt))


@pytest.mark.parametrize("sx", [1.0, 2.5])
def test_bdsc_band_includes_voxels_at_exactly_the_distance(sx):
    """Skull at x = 0; with spacing sx the voxel at x = 10 / sx is at exactly 10 mm and is in the band (<=)."""
    skull = np.zeros((24, 8, 8), bool)
    skull[0] = True
    edge = int(round(10.0 / sx))
    gt = np.zeros_like(skull)
    gt[edge, 2:6, 2:6] = True
    pred = gt.copy()
    pred[edge - 1, 2:6, 2:6] = True
    assert boundary_dice(pred, gt, skull, (sx, 1.0, 1.0)) == pytest.approx(2 / 3)


def test_bdsc_cropping_is_exact_on_random_shapes():
    rng = np.random.default_rng(2)
    for spacing in [(1.0, 1.0, 1.0), (0.4, 0.5, 1.25), (2.0, 2.0, 2.5)]:
        shape = (60, 40, 30)
        skull = np.zeros(shape, bool)
        skull[:, :, :3] = True
        skull[rng.integers(0, 60, 20), rng.integers(0, 40, 20), rng.integers(3, 30, 20)] = True
        pred = np.zeros(shape, bool)
        gt = np.zeros(shape, bool)
        pred[10:34, 8:28, 4:20], gt[14:38, 6:26, 5:21] = blob(rng), blob(rng)
        assert boundary_dice(pred, gt, skull, spacing) == pytest.approx(full_volume_bdsc(pred, gt, skull, spacing))


# ---------------------------------------------------------------- empty masks and bad input
def test_empty_mask_rules():
    empty = np.zeros((16, 16, 16), bool)
    full = cube((16, 16, 16), (4, 4, 4), 6)
    skull = cube((16, 16, 16), (0, 0, 0), 3)
    assert dice(empty, empty) == 1.0 and dice(full, empty) == 0.0 and dice(empty, full) == 0.0
    assert hd95(empty, empty, 1.0) == 0.0
    assert math.isnan(hd95(full, empty, 1.0)) and math.isnan(hd95(empty, full, 1.0))
    assert boundary_dice(empty, empty, skull, 1.0) == 1.0
    assert boundary_dice(full, empty, skull, 1.0) == 0.0
    with pytest.raises(ValueError, match="defective"):
        boundary_dice(full, full, empty, 1.0)


def test_bad_input_is_rejected_with_the_argument_name():
    a = cube((16, 16, 16), (4, 4, 4), 6)
    with pytest.raises(ValueError, match="shapes differ"):
        dice(a, a[:-1])
    with pytest.raises(ValueError, match="gt: .*between 0 and 1"):
        dice(a, a * 0.7)
    with pytest.raises(ValueError, match="pred: expected"):
        hd95(a[0], a[0], 1.0)
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        HD95Metric()(torch.from_numpy(a)[None, None].float(), torch.from_numpy(a)[None, None].float())


# ---------------------------------------------------------------- MONAI cumulative metrics
def batch_of(masks, spacing=None):
    """(B, 1, X, Y, Z) float tensor; with spacing, a collated MetaTensor batch as a MONAI DataLoader makes."""
    if spacing is None:
        return torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    return list_data_collate([MetaTensor(torch.from_numpy(m[None].astype(np.float32)), affine=affine) for m in masks])


def cases(n=3, seed=3):
    """n cases (pred, gt, skull) of implant-like plates next to a skull slab, with varied overlap."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pred, gt, skull = skull_and_implants()
        pred = np.roll(pred, (int(rng.integers(0, 3)), i), axis=(0, 1))
        out.append((pred, gt, skull))
    return out


def test_cumulative_metrics_buffer_per_case_values_and_reduce_with_nan():
    spacing = (0.5, 0.5, 1.0)
    data = cases()
    preds, gts, skulls = zip(*data)
    y_pred, y = batch_of(preds), batch_of(gts)
    hd_metric = HD95Metric(spacing=spacing, get_not_nans=True)
    hd_metric(y_pred, y)
    hd_metric(batch_of([gts[0]]), batch_of([np.zeros_like(gts[0])]))  # one empty mask -> nan
    per_case = [hd95(p, g, spacing) for p, g in zip(preds, gts)]
    buffer = hd_metric.get_buffer()
    assert buffer.shape == (4, 1) and torch.isnan(buffer[3, 0])
    assert buffer[:3, 0].tolist() == pytest.approx(per_case)
    mean, not_nans = hd_metric.aggregate()
    assert mean.item() == pytest.approx(np.mean(per_case)) and not_nans.item() == 3
    assert hd_metric.aggregate(reduction="none")[0].shape == (4, 1)

    dsc = ImplantDiceMetric()
    dsc(y_pred, y)
    assert dsc.aggregate().item() == pytest.approx(np.mean([dice(p, g) for p, g in zip(preds, gts)]))


def test_bdsc_metric_defective_kwarg_and_two_channel_y_agree():
    spacing = (1.0, 1.0, 1.0)
    preds, gts, skulls = zip(*cases())
    expected = [boundary_dice(p, g, s, spacing) for p, g, s in zip(preds, gts, skulls)]
    by_kwarg = BoundaryDiceMetric(spacing=spacing, reduction="none")
    values = by_kwarg(batch_of(preds), batch_of(gts), defective=batch_of(skulls))
    assert values[:, 0].tolist() == pytest.approx(expected)
    two_channel = torch.cat([batch_of(gts), batch_of(skulls)], dim=1)
    by_channel = BoundaryDiceMetric(spacing=spacing)
    by_channel(batch_of(preds), two_channel)
    assert by_channel.aggregate().item() == pytest.approx(np.mean(expected))
    with pytest.raises(ValueError, match=r"\(B, 2, X, Y, Z\)"):
        by_channel(batch_of(preds), batch_of(gts))


def test_spacing_comes_from_metatensor_and_call_kwarg_overrides():
    preds, gts, _ = zip(*cases(2))
    spacing = (0.4, 0.8, 1.2)
    expected = [hd95(p, g, spacing) for p, g in zip(preds, gts)]
    metric = HD95Metric(reduction="none")
    from_meta = metric(batch_of(preds, spacing), batch_of(gts, spacing))
    assert from_meta[:, 0].tolist() == pytest.approx(expected)
    from_kwarg = metric(batch_of(preds, spacing), batch_of(gts, spacing), spacing=(0.8, 1.6, 2.4))
    assert from_kwarg[:, 0].tolist() == pytest.approx([2 * e for e in expected])
    per_case = metric(batch_of(preds), batch_of(gts), spacing=[spacing, (0.8, 1.6, 2.4)])
    assert per_case[:, 0].tolist() == pytest.approx([expected[0], 2 * expected[1]])
    with pytest.raises(ValueError, match="differs"):
        metric(batch_of(preds, spacing), batch_of(gts, (1.0, 1.0, 1.0)))


def test_spacing_from_nrrd_header_via_monai_loader(tmp_path):
    """Masks written as .nrrd with anisotropic spacing, read by MONAI: HD95 uses the header spacing."""
    spacing = (0.45, 0.45, 1.5)
    pred, gt, _ = cases(1)[0]
    header = {"space": "left-posterior-superior", "space directions": np.diag(spacing), "space origin": [5, 6, 7]}
    for name, m in (("pred", pred), ("gt", gt)):
        nrrd.write(str(tmp_path / f"{name}.nrrd"), m.astype(np.uint8), header)
    load = LoadImage(reader="NrrdReader", image_only=True)
    y_pred, y = (EnsureChannelFirst()(load(str(tmp_path / f"{n}.nrrd")))[None] for n in ("pred", "gt"))
    assert tuple(y_pred.shape) == (1, 1, *pred.shape)
    assert HD95Metric(reduction="none")(y_pred, y).item() == pytest.approx(hd95(pred, gt, spacing), rel=1e-6)


# ---------------------------------------------------------------- Ignite
def test_ignite_handlers_report_the_mean_of_per_case_values():
    torch.manual_seed(0)
    spacing = (0.5, 0.5, 1.0)
    data = cases(5)
    batches = [data[:2], data[2:4], data[4:]]

    def step(engine, batch):
        preds, gts, skulls = zip(*batch)
        pred, gt, skull = (batch_of(m, spacing) for m in (preds, gts, skulls))
        # decollated lists of channel-first MetaTensors, as MONAI evaluators produce
        return {"pred": decollate_batch(pred), "label": decollate_batch(torch.cat([gt, skull], dim=1))}

    engine = Engine(step)
    first = lambda o: (o["pred"], [y[:1] for y in o["label"]])  # noqa: E731
    ImplantDiceHandler(output_transform=first).attach(engine, "dsc")
    HD95Handler(output_transform=first).attach(engine, "hd95")
    BoundaryDiceHandler(output_transform=lambda o: (o["pred"], o["label"])).attach(engine, "bdsc")
    engine.run(batches, max_epochs=1)

    preds, gts, skulls = zip(*data)
    m = engine.state.metrics
    assert m["dsc"] == pytest.approx(np.mean([dice(p, g) for p, g in zip(preds, gts)]))
    assert m["hd95"] == pytest.approx(np.mean([hd95(p, g, spacing) for p, g in zip(preds, gts)]), rel=1e-6)
    assert m["bdsc"] == pytest.approx(
        np.mean([boundary_dice(p, g, s, spacing) for p, g, s in zip(preds, gts, skulls)])
    )
    assert engine.state.metric_details["hd95"].shape == (5, 1)

