"""AutoImplant 2021 evaluation metrics: DSC, boundary DSC (bDSC) and pooled HD95.

Definitions follow the challenge's evaluation code (Kodym et al., github.com/OldaKodym/evaluation_metrics),
so numbers are comparable with the published SkullBreak / SkullFix results. See docs/metrics.md.

Masks are binary volumes (X, Y, Z) (or channel-first (1, X, Y, Z)), numpy or torch; any non-zero voxel is
foreground. Spacing is (sx, sy, sz) in mm along the array axes. Empty-mask rules (all three metrics):
both masks empty -> perfect agreement (DSC 1.0, HD95 0.0); exactly one empty -> DSC 0.0, HD95 nan
("not computable", the MONAI convention; ignored by the "mean" reduction and counted by ``get_not_nans``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric, DiceMetric, HausdorffDistanceMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction, convert_to_numpy
from scipy.ndimage import binary_erosion, distance_transform_edt, find_objects, generate_binary_structure

from scripts.io import volume3d

SpacingLike = float | Sequence[float] | np.ndarray | torch.Tensor

# 6-connected structuring element: the surface is what one cross-shaped erosion removes (as in the challenge).
_CROSS = generate_binary_structure(3, 1)


def _as_mask(x, name: str) -> np.ndarray:
    """(X, Y, Z) or (1, X, Y, Z) numpy/torch volume -> bool (X, Y, Z); non-zero is foreground."""
    a = volume3d(x, name)
    if np.issubdtype(a.dtype, np.floating) and np.any((a > 0) & (a < 1)):
        raise ValueError(f"{name}: has values strictly between 0 and 1; threshold it to a binary mask first.")
    return a != 0


def _masks(**named) -> list[np.ndarray]:
    """Binarise several same-shaped volumes, naming the offending argument on error."""
    masks = [_as_mask(v, k) for k, v in named.items()]
    shapes = {k: m.shape for k, m in zip(named, masks)}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"mask shapes differ: {shapes}.")
    return masks


def _as_spacing(spacing: SpacingLike, name: str = "spacing") -> np.ndarray:
    """Scalar or 3 values -> float64 (3,), all positive and finite."""
    s = np.asarray(convert_to_numpy(spacing, wrap_sequence=True), dtype=np.float64).ravel()
    if s.size == 1:
        s = np.repeat(s, 3)
    if s.shape != (3,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"{name}: expected one or three positive voxel sizes in mm, got {spacing!r}.")
    return s


def _bbox(mask: np.ndarray, margin: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of a non-empty bool mask grown by ``margin`` (3,) voxels, clipped to the volume."""
    box = find_objects(mask.view(np.uint8))[0]
    return tuple(
        slice(max(sl.start - int(m), 0), min(sl.stop + int(m), n)) for sl, m, n in zip(box, margin, mask.shape)
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(a & b) / total


def dice(pred, gt) -> float:
    """Dice similarity coefficient 2|A & B| / (|A| + |B|) of two (X, Y, Z) masks; 1.0 if both are empty."""
    return _dice(*_masks(pred=pred, gt=gt))


def boundary_dice(pred, gt, defective, spacing: SpacingLike, distance_mm: float = 10.0) -> float:
    """DSC of ``pred`` and ``gt`` restricted to the band of voxels within ``distance_mm`` of the defective skull.

    Band = ``distance_transform_edt(~defective, sampling=spacing) <= distance_mm``; it contains the skull itself
    (distance 0), exactly as the challenge code (which zeroes both implants where the distance is ``> distance``).
    1.0 when neither mask has a voxel in the band. Raises ValueError if ``defective`` is empty.
    """
    a, b, d = _masks(pred=pred, gt=gt, defective=defective)
    sp = _as_spacing(spacing)
    if not d.any():
        raise ValueError("defective: the defective-skull mask is empty, the boundary band is undefined.")
    fg = a | b
    if not fg.any():
        return 1.0
    # Exact crop: a voxel of the pred/gt box lies in the band iff some skull voxel within distance_mm of it
    # exists, and every such voxel is inside the box grown by distance_mm / spacing along each axis.
    box = _bbox(fg, np.floor(distance_mm / sp) + 1)
    skull = d[box]
    if not skull.any():
        return 1.0
    band = distance_transform_edt(~skull, sampling=sp) <= distance_mm
    return _dice(a[box] & band, b[box] & band)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels removed by one 6-connected erosion (voxels on the array border count as surface)."""
    return mask & ~binary_erosion(mask, structure=_CROSS)


def hd95(pred, gt, spacing: SpacingLike) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm, AutoImplant style.

    Distances from every surface voxel of ``pred`` to the surface of ``gt`` and from every surface voxel of
    ``gt`` to the surface of ``pred`` are pooled into one array; returns ``np.percentile(pooled, 95)`` (linear
    interpolation). 0.0 if both masks are empty, nan if exactly one is.
    """
    a, b = _masks(pred=pred, gt=gt)
    sp = _as_spacing(spacing)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("nan")
    # Exact crop: every surface voxel lies in the joint box, so EDT distances to them are unchanged; the
    # 1-voxel margin keeps the erosion identical (outside the box is background either way).
    box = _bbox(a | b, np.ones(3))
    sa, sb = _surface(a[box]), _surface(b[box])
    pooled = np.concatenate(
        [distance_transform_edt(~sb, sampling=sp)[sa], distance_transform_edt(~sa, sampling=sp)[sb]]
    )
    return float(np.percentile(pooled, 95))


def monai_reference_metrics(pred, gt, spacing: SpacingLike) -> dict[str, float]:
    """MONAI's own ``DiceMetric`` and ``HausdorffDistanceMetric(percentile=95)`` on one case, for comparison.

    Returns {"monai_dice", "monai_hd95"}. MONAI's rules apply: nan Dice when ``gt`` is empty, nan HD95 when
    either mask is empty, and HD95 is the max of the two directed 95th percentiles (not the pooled one).
    """
    a, b = _masks(pred=pred, gt=gt)
    sp = _as_spacing(spacing)
    if a.any() or b.any():  # both metrics are invariant to cropping to the joint box (+1 voxel for edges)
        box = _bbox(a | b, np.ones(3))
        a, b = a[box], b[box]
    yp, yt = (torch.from_numpy(np.ascontiguousarray(m))[None, None].float() for m in (a, b))
    monai_dice = DiceMetric(include_background=True, reduction="none")(yp, yt)
    monai_hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
        yp, yt, spacing=sp.tolist()
    )
    return {"monai_dice": float(monai_dice), "monai_hd95": float(monai_hd)}


def _batch(t, name: str, channels: int = 1) -> np.ndarray:
    """Batch-first channel-first (B, C, X, Y, Z) tensor/array -> numpy, checking C."""
    if t is None:
        raise ValueError(f"{name}: required, got None.")
    a = convert_to_numpy(t)
    if a.ndim != 5 or a.shape[1] != channels:
        raise ValueError(f"{name}: expected shape (B, {channels}, X, Y, Z), got {tuple(a.shape)}.")
    return a


class _ImplantMetric(CumulativeIterationMetric):
    """Per-case implant metric on (B, 1, X, Y, Z) batches, buffered as (B, 1) and reduced like MONAI metrics.

    Spacing for the mm-based metrics, first match wins: ``spacing=`` passed to ``__call__`` (one spacing or
    one per case, (B, 3)), the constructor's ``spacing``, the ``pixdim`` of ``y_pred`` / ``y`` when they are
    MetaTensors (they must agree). Plain tensors without any spacing are rejected.
    """

    def __init__(
        self,
        spacing: SpacingLike | None = None,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__()
        self.spacing = None if spacing is None else _as_spacing(spacing, "spacing (constructor)")
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _spacings(self, y_pred, y, spacing, batch: int) -> list[np.ndarray]:
        """One (3,) mm spacing per case, resolved in the order documented on the class."""
        spacing = self.spacing if spacing is None else spacing
        if spacing is None:
            found = {
                n: np.asarray(convert_to_numpy(t.pixdim, wrap_sequence=True), dtype=np.float64).reshape(-1, 3)
                for n, t in (("y_pred", y_pred), ("y", y))
                if isinstance(t, MetaTensor)
            }
            if not found:
                raise ValueError("spacing: y_pred/y are not MetaTensors; pass spacing= to the metric or its call.")
            if len(found) == 2 and not np.allclose(found["y_pred"], found["y"]):
                raise ValueError(f"spacing: y_pred pixdim {found['y_pred']} differs from y pixdim {found['y']}.")
            spacing = next(iter(found.values()))
        s = np.asarray(convert_to_numpy(spacing, wrap_sequence=True), dtype=np.float64)
        if s.ndim == 2 and len(s) > 1:
            if len(s) != batch:
                raise ValueError(f"spacing: got {len(s)} per-case spacings for a batch of {batch}.")
            return [_as_spacing(row) for row in s]
        return [_as_spacing(s.reshape(-1))] * batch

    def aggregate(self, reduction: MetricReduction | str | None = None):
        """Reduce the buffered (N, 1) per-case values, ignoring nan; (value, not_nans) if ``get_not_nans``."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{type(self).__name__}: nothing to aggregate, call the metric on a batch first.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


def _column(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1)


class ImplantDiceMetric(_ImplantMetric):
    """DSC per case (see :func:`dice`). y_pred, y: (B, 1, X, Y, Z). Spacing is accepted and ignored."""

    def _compute_tensor(self, y_pred, y=None, spacing=None):  # type: ignore[override]
        pred, gt = _batch(y_pred, "y_pred"), _batch(y, "y")
        return _column([dice(p, g) for p, g in zip(pred[:, 0], gt[:, 0])])


class HD95Metric(_ImplantMetric):
    """Pooled HD95 in mm per case (see :func:`hd95`). y_pred, y: (B, 1, X, Y, Z)."""

    def _compute_tensor(self, y_pred, y=None, spacing=None):  # type: ignore[override]
        pred, gt = _batch(y_pred, "y_pred"), _batch(y, "y")
        sps = self._spacings(y_pred, y, spacing, len(pred))
        return _column([hd95(p, g, s) for p, g, s in zip(pred[:, 0], gt[:, 0], sps)])


class BoundaryDiceMetric(_ImplantMetric):
    """bDSC per case (see :func:`boundary_dice`). y_pred: (B, 1, X, Y, Z).

    The defective skull comes either as ``defective=`` (B, 1, X, Y, Z) in the call with y (B, 1, X, Y, Z),
    or as the second channel of y: (B, 2, X, Y, Z) = [implant, defective skull]. The 2-channel form is the
    one to use inside an Ignite handler, whose ``update`` only forwards (y_pred, y).
    """

    def __init__(
        self,
        spacing: SpacingLike | None = None,
        distance_mm: float = 10.0,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(spacing=spacing, reduction=reduction, get_not_nans=get_not_nans)
        if not distance_mm > 0:
            raise ValueError(f"distance_mm: must be positive, got {distance_mm}.")
        self.distance_mm = float(distance_mm)

    def _compute_tensor(self, y_pred, y=None, defective=None, spacing=None):  # type: ignore[override]
        pred = _batch(y_pred, "y_pred")
        if defective is None:
            both = _batch(y, "y (no defective= given, so [implant, defective] channels)", channels=2)
            gt, skull = both[:, 0], both[:, 1]
        else:
            gt, skull = _batch(y, "y")[:, 0], _batch(defective, "defective")[:, 0]
        if not len(pred) == len(gt) == len(skull):
            raise ValueError(f"batch sizes differ: y_pred {len(pred)}, y {len(gt)}, defective {len(skull)}.")
        sps = self._spacings(y_pred, y, spacing, len(pred))
        return _column(
            [boundary_dice(p, g, d, s, self.distance_mm) for p, g, d, s in zip(pred[:, 0], gt, skull, sps)]
        )


class ImplantDiceHandler(IgniteMetricHandler):
    """Ignite handler for :class:`ImplantDiceMetric`; ``output_transform`` must yield (y_pred, y)."""

    def __init__(self, output_transform: Callable = lambda x: x, save_details: bool = True) -> None:
        super().__init__(ImplantDiceMetric(), output_transform=output_transform, save_details=save_details)


class BoundaryDiceHandler(IgniteMetricHandler):
    """Ignite handler for :class:`BoundaryDiceMetric`; ``output_transform`` must yield (y_pred, y) with
    y = [implant, defective skull] along channels."""

    def __init__(
        self,
        spacing: SpacingLike | None = None,
        distance_mm: float = 10.0,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric = BoundaryDiceMetric(spacing=spacing, distance_mm=distance_mm)
        super().__init__(metric, output_transform=output_transform, save_details=save_details)


class HD95Handler(IgniteMetricHandler):
    """Ignite handler for :class:`HD95Metric`; ``output_transform`` must yield (y_pred, y)."""

    def __init__(
        self, spacing: SpacingLike | None = None, output_transform: Callable = lambda x: x, save_details: bool = True
    ) -> None:
        super().__init__(HD95Metric(spacing=spacing), output_transform=output_transform, save_details=save_details)
