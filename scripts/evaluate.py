"""Score predicted implants against ground truth with the AutoImplant metrics (``configs/evaluate.json``).

Prediction layout (written by the inference job): ``<predictions_dir>/<case_id>/<name><suffix>`` with
``name`` "implant" (one sample or the ensemble's final implant) or "implant_mean" (ensemble majority
vote) and the suffix of the input (.nrrd, .nii.gz, .nii), on the input's grid; see :func:`case_id`.

The evaluation engine is a ``monai.engines.Evaluator`` wired in ``configs/evaluate.json``: it loads
(defective, implant, prediction) triples, :func:`evaluation_step` turns them into pred/label tensors,
Ignite metric handlers compute DSC, bDSC, HD95 (``scripts.metrics``) and MONAI's Dice / HD95 for
comparison, ``MetricsSaver`` writes per-case CSVs and :class:`EvaluationReport` writes
``metrics.json`` and ``metrics.md``. :func:`evaluate_predictions` runs that config from Python.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor, decollate_batch
from monai.engines.utils import IterationEvents
from monai.handlers import IgniteMetricHandler
from monai.metrics import HausdorffDistanceMetric
from monai.utils import CommonKeys

from scripts.data.datalist import case_id
from scripts.io import MASK_SUFFIXES, MaskError, affine_spacing, atomic_write, mask_suffix, read_header_geometry

__all__ = [
    "METRICS",
    "EVAL_CONFIG",
    "case_id",
    "prediction_datalist",
    "PixdimHausdorffDistanceMetric",
    "PixdimHausdorffDistance",
    "evaluation_step",
    "EvaluationReport",
    "evaluate_predictions",
]

# Ignite metric name -> column label; the config attaches its handlers under these names.
METRICS = {"dsc": "DSC", "bdsc": "bDSC", "hd95": "HD95 mm", "monai_dice": "monai_dice", "monai_hd95": "monai_hd95 mm"}
BOUNDARY_LABEL = "boundary_label"  # output key of y = [implant, defective skull] for the bDSC handler
EVAL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "evaluate.json"
logger = logging.getLogger(__name__)
_NO_DEFECT = "unspecified"  # defect class of entries without a "defect" key (plain files)


def _check_grid(prediction: Path, truth: str) -> None:
    """Header-only check that a prediction has the ground truth's shape and spacing (MaskError otherwise)."""
    (p_shape, p_spacing), (t_shape, t_spacing) = read_header_geometry(prediction), read_header_geometry(truth)
    if p_shape != t_shape:
        raise MaskError(f"grid mismatch: prediction {prediction} has shape {p_shape}, ground truth {truth} {t_shape}")
    if p_spacing is None or t_spacing is None or not np.allclose(p_spacing, t_spacing, rtol=1e-5):
        raise MaskError(
            f"grid mismatch: prediction {prediction} has spacing {p_spacing}, ground truth {truth} {t_spacing}"
        )


def prediction_datalist(
    datalist: Sequence[dict],
    predictions_dir: str | os.PathLike,
    prediction_name: str = "implant",
    skip_missing: bool = False,
) -> dict[str, list[dict]]:
    """Pair ground-truth entries with their prediction files.

    Args:
        datalist: entries with "defective" and "implant" paths (as from ``skullbreak_datalist``), plus the
            keys :func:`case_id` uses; "defect" is the class for per-class means.
        predictions_dir: folder holding one ``<case_id>/`` folder per case.
        prediction_name: file name without suffix, e.g. "implant" or "implant_mean".
        skip_missing: skip cases without a prediction (listed under "skipped") instead of raising.
    Returns:
        {"cases": [{"defective", "implant", "prediction", "case_id", "defect"}], "skipped": [{"case_id",
        "expected"}]}.
    Raises:
        FileNotFoundError: a prediction is missing (names the case and the expected path), or every case is.
        MaskError: a prediction's shape or spacing differs from its ground truth (names both files).
    """
    if not prediction_name or Path(prediction_name).name != prediction_name:
        raise ValueError(f"prediction_name: expected a file name without folders, got {prediction_name!r}")
    root = Path(predictions_dir)
    cases, skipped, seen = [], [], set()
    for entry in datalist:
        missing = [k for k in ("defective", "implant") if k not in entry]
        if missing:
            raise ValueError(f"datalist entry {entry}: no {missing} path (ground truth needed for evaluation)")
        cid = case_id(entry)
        if cid in seen:
            raise ValueError(f"datalist: case {cid!r} appears twice")
        seen.add(cid)
        suffix = mask_suffix(entry["implant"])
        candidates = [root / cid / f"{prediction_name}{s}" for s in dict.fromkeys((suffix, *MASK_SUFFIXES))]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            if not skip_missing:
                raise FileNotFoundError(f"case {cid}: no prediction, expected {candidates[0]}")
            skipped.append({"case_id": cid, "expected": str(candidates[0])})
            continue
        _check_grid(found, entry["implant"])
        cases.append(
            {
                "defective": entry["defective"],
                "implant": entry["implant"],
                "prediction": str(found),
                "case_id": cid,
                "defect": entry.get("defect", _NO_DEFECT),
            }
        )
    if skipped:
        logger.warning("no %s prediction for %d case(s), skipped: %s", prediction_name, len(skipped),
                       ", ".join(s["case_id"] for s in skipped))
    if not cases:
        raise FileNotFoundError(f"{root}: no {prediction_name} prediction for any of the {len(datalist)} cases")
    return {"cases": cases, "skipped": skipped}


class PixdimHausdorffDistanceMetric(HausdorffDistanceMetric):
    """MONAI's ``HausdorffDistanceMetric`` with the voxel spacing read from the MetaTensor affine of ``y``.

    MONAI's ``HausdorffDistance`` handler forwards only (y_pred, y), so without this its distances would be
    in voxels. An explicit ``spacing=`` in the call still wins.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:  # type: ignore
        if kwargs.get("spacing") is None:
            if not isinstance(y, MetaTensor):
                raise ValueError("y: not a MetaTensor, so no voxel spacing; pass spacing= in the call.")
            affines = torch.as_tensor(y.affine, dtype=torch.float64).reshape(-1, 4, 4)
            kwargs["spacing"] = [affine_spacing(a).tolist() for a in affines]
        return super()._compute_tensor(y_pred, y, **kwargs)


class PixdimHausdorffDistance(IgniteMetricHandler):
    """Ignite handler for :class:`PixdimHausdorffDistanceMetric` (mm); ``output_transform`` yields (y_pred, y)."""

    def __init__(
        self,
        include_background: bool = True,
        percentile: float | None = 95,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric = PixdimHausdorffDistanceMetric(include_background=include_background, percentile=percentile)
        super().__init__(metric, output_transform=output_transform, save_details=save_details)


def evaluation_step(engine: Engine, batch: dict) -> dict:
    """Evaluator ``iteration_update``: loaded masks (B, 1, X, Y, Z) -> {"pred", "label", "boundary_label"}.

    "boundary_label" = [implant, defective skull] along channels (B, 2, X, Y, Z), the y the bDSC handler
    needs. Fires ``MODEL_COMPLETED`` so the engine decollates batch and output like MONAI's evaluators.
    """
    engine.state.output = {
        CommonKeys.PRED: batch["prediction"],
        CommonKeys.LABEL: batch["implant"],
        BOUNDARY_LABEL: torch.cat([batch["implant"], batch["defective"]], dim=1),
    }
    engine.fire_event(IterationEvents.MODEL_COMPLETED)
    return engine.state.output


def _summary(rows: list[dict]) -> dict[str, dict]:
    """{metric: {"mean", "std", "n"}} over the rows' non-nan values (population std; None if no value)."""
    out = {}
    for name in METRICS:
        v = np.array([r[name] for r in rows if r[name] is not None], dtype=np.float64)
        out[name] = {"mean": None, "std": None, "n": len(v)}
        if v.size:
            out[name].update(mean=float(v.mean()), std=float(v.std()))
    return out


def _fmt(value: float | None, name: str) -> str:
    return "n/a" if value is None else f"{value:.3f}" if "hd95" in name else f"{value:.4f}"


def _table_head(first: str, last: str) -> list[str]:
    return [f"| {' | '.join([first, *METRICS.values(), last])} |", "|" + "---|" * (len(METRICS) + 2)]


def _markdown(report: dict) -> str:
    """metrics.md: per-case table with a mean row, per-defect-class means, skipped cases."""
    lines = [
        f"# Implant evaluation: `{report['prediction_name']}` vs ground truth",
        "",
        f"{report['num_cases']} cases, {len(report['skipped'])} skipped. AutoImplant definitions: DSC, bDSC"
        f" ({report['boundary_mm']:g} mm band), HD95 (pooled, mm); MONAI's metrics: monai_dice, monai_hd95"
        " (max of the directed 95th percentiles, mm).",
        "",
        *_table_head("case", "defect"),
    ]
    for row in report["cases"]:
        lines.append(f"| {row['case_id']} | " + " | ".join(_fmt(row[m], m) for m in METRICS) + f" | {row['defect']} |")
    mean = report["metrics"]
    lines.append("| **mean** | " + " | ".join(_fmt(mean[m]["mean"], m) for m in METRICS) + " | all |")
    lines += ["", "## Per defect class (mean ± std)", "", *_table_head("defect", "cases")]
    for defect, part in report["per_defect"].items():
        cells = [f"{_fmt(s['mean'], m)} ± {_fmt(s['std'], m)}" for m, s in part["metrics"].items()]
        lines.append(f"| {defect} | " + " | ".join(cells) + f" | {part['num_cases']} |")
    if report["skipped"]:
        lines += ["", "## Skipped (no prediction)", ""]
        lines += [f"- {s['case_id']}: {s['expected']}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


class EvaluationReport:
    """Ignite handler: on ``COMPLETED`` writes ``metrics.json`` and ``metrics.md`` into ``output_dir``.

    Per-case values come from ``engine.state.metric_details`` of the handlers named as in :data:`METRICS`
    (attach them with ``save_details=True``); case ids and defect classes from the batches; ``boundary_mm``
    is the bDSC band width, recorded in the report. nan values
    (MONAI's "not computable") are written as null / "n/a" and left out of the means. The report dict is
    kept in ``self.report``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        prediction_name: str,
        skipped: Sequence[dict] = (),
        boundary_mm: float = 10.0,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.prediction_name = prediction_name
        self.boundary_mm = float(boundary_mm)
        self.skipped = list(skipped)
        self.report: dict | None = None
        self._cases: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._cases.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self)

    def _collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        for item in decollate_batch(batch) if isinstance(batch, dict) else batch:
            self._cases.append(
                {
                    "case_id": item["case_id"],
                    "defect": item["defect"],
                    "prediction": str(item["prediction"].meta["filename_or_obj"]),
                }
            )

    def __call__(self, engine: Engine) -> None:
        details = getattr(engine.state, "metric_details", {})
        missing = [m for m in METRICS if m not in details]
        if missing:
            raise KeyError(f"EvaluationReport: no per-case values for {missing}; attach those metric handlers")
        rows = [dict(c) for c in self._cases]
        for name in METRICS:
            values = torch.as_tensor(details[name]).reshape(-1).tolist()
            if len(values) != len(rows):
                raise ValueError(f"EvaluationReport: {len(values)} {name} values for {len(rows)} cases")
            for row, v in zip(rows, values):
                row[name] = None if math.isnan(v) else v
        by_defect: dict[str, list[dict]] = {}
        for row in rows:
            by_defect.setdefault(row["defect"], []).append(row)
        self.report = {
            "prediction_name": self.prediction_name,
            "boundary_mm": self.boundary_mm,
            "num_cases": len(rows),
            "metrics": _summary(rows),
            "per_defect": {
                d: {"num_cases": len(part), "metrics": _summary(part)} for d, part in sorted(by_defect.items())
            },
            "cases": rows,
            "skipped": self.skipped,
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        report = json.dumps(self.report, indent=2) + "\n"
        atomic_write(self.output_dir / "metrics.json", lambda tmp: Path(tmp).write_text(report), overwrite=True)
        atomic_write(self.output_dir / "metrics.md", lambda tmp: Path(tmp).write_text(_markdown(self.report)),
                     overwrite=True)


def evaluate_predictions(
    datalist: Sequence[dict],
    predictions_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    prediction_name: str = "implant",
    skip_missing: bool = False,
    **overrides,
) -> dict:
    """Run ``configs/evaluate.json`` on ``datalist`` and return the report written to metrics.json.

    Args:
        datalist: ground-truth entries (see :func:`prediction_datalist`).
        predictions_dir: folder with one ``<case_id>/`` folder per case.
        output_dir: where metrics.json, metrics.md and MetricsSaver's CSVs go.
        prediction_name: "implant" or "implant_mean" (the config's ``metric``).
        skip_missing: skip cases without a prediction instead of raising.
        overrides: further config overrides, e.g. ``num_workers=2``.
    """
    workflow = ConfigWorkflow(
        config_file=str(EVAL_CONFIG),
        meta_file=str(EVAL_CONFIG.parent / "metadata.json"),
        logging_file=False,  # a library call must not reconfigure the caller's logging
        workflow_type=None,
        datalist=list(datalist),
        predictions_dir=str(predictions_dir),
        output_dir=str(output_dir),
        metric=prediction_name,
        skip_missing=skip_missing,
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow.parser.get_parsed_content("report").report
