"""The cases of an inference batch: input files and names, a dataset that lets one bad case fail alone,
the evaluator's iteration and the batch report (``<output_dir>/summary.json``).

Per case the inference config runs ``preprocessing`` (in :class:`CaseDataset`), the ``inferer`` and
``postprocessing`` (in the evaluator's iteration, :func:`infer_case`). A case whose results exist is
skipped; a case that fails (unreadable file, no defect found, ...) is recorded with its file and reason
and the others go on; :class:`CaseReport` writes the batch summary and then raises
:class:`~scripts.cli.BatchError` naming every failure.
"""

from __future__ import annotations

import hashlib
import gc
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ignite.engine import Engine, Events
from monai.data import Dataset
from monai.transforms import apply_transform

from scripts.cli import BatchError
from scripts.data.datalist import case_id
from scripts.io import MASK_SUFFIXES, atomic_write, mask_suffix
from scripts.paths import safe_name

__all__ = ["file_sha256", "list_inputs", "case_name", "case_datalist", "CaseDataset", "infer_case", "predict_case",
           "CaseReport"]

logger = logging.getLogger(__name__)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (recorded in summaries so results name the exact weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_inputs(source: str | os.PathLike | Sequence) -> list[Path]:
    """A mask file, a folder of mask files, or a list of files -> sorted list of mask paths."""
    if isinstance(source, (list, tuple)):
        return [Path(p) for p in source]
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(MASK_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"{path}: folder holds no .nrrd/.nii/.nii.gz masks")
        return files
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    return [path]


def case_name(path: str | os.PathLike) -> str:
    """Output folder name of an input file: its name without the mask suffix, made safe by
    :func:`scripts.paths.safe_name` (a name with ``..``, spaces or non-ASCII letters gets a hash suffix)."""
    name = Path(path).name
    return safe_name(name[: -len(mask_suffix(name))])


def case_datalist(inputs: str | os.PathLike | Sequence) -> list[dict]:
    """A file, a folder, a list of files, or datalist entries (named by
    :func:`scripts.data.datalist.case_id`) -> ``[{"image": path, "input": path, "case": name}]``
    (preprocessing loads ``image``; ``input`` names the file in summaries and failures)."""
    if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], dict):
        cases = [(str(e["defective"]), case_id(e)) for e in inputs]
    else:
        cases = [(str(p), case_name(p)) for p in list_inputs(inputs)]
    return [{"image": path, "input": path, "case": name} for path, name in cases]


def _unwrapped(err: BaseException) -> BaseException:
    """The error a transform or expression raised, without the plain RuntimeErrors MONAI wraps it in."""
    while type(err) is RuntimeError and err.__cause__ is not None:
        err = err.__cause__
    return err


def _failure(case: dict, err: BaseException) -> dict:
    """A failed case: its ``input`` file, ``case`` name and ``error`` as "<type>: <message>"."""
    err = _unwrapped(err)
    return {"input": case["input"], "case": case["case"], "error": f"{type(err).__name__}: {err}"}


class CaseDataset(Dataset):
    """The inference dataset: ``preprocessing`` applied to each :func:`case_datalist` entry.

    A case with ``<output_dir>/<case>/summary.json`` is
    not loaded but marked ``skipped`` (unless ``overwrite``); a case whose preprocessing fails is marked
    with its ``error``, so one bad file does not stop the batch. Loaded cases carry their start time
    (``started``) for the summary.
    """

    def __init__(self, data: Sequence[dict], transform: Callable, output_dir: str | os.PathLike,
                 overwrite: bool = False) -> None:
        super().__init__(data, transform)
        self.output_dir, self.overwrite = Path(output_dir), overwrite

    def _transform(self, index: int) -> dict:
        case = dict(self.data[index])
        done = self.output_dir / case["case"] / "summary.json"
        if done.is_file() and not self.overwrite:
            return {"input": case["input"], "case": case["case"], "skipped": str(done)}
        started = time.perf_counter()
        try:
            return {**apply_transform(self.transform, case), "started": started}
        except Exception as err:  # noqa: BLE001 - one bad case must not stop the batch
            return _failure(case, err)


def infer_case(engine: Engine, batch: dict) -> dict:
    """``iteration_update`` of the inference evaluator: the evaluator's own iteration (inferer, then
    the registered postprocessing) for a loaded case; a skipped or failed case passes through, and an
    error becomes the case's ``error``."""
    if "skipped" in batch or "error" in batch:
        return batch
    try:
        return engine._iteration(engine, batch)
    except Exception as err:  # noqa: BLE001 - one bad case must not stop the batch
        return _failure(batch, err)


def predict_case(case: dict, preprocessing: Callable, inferer: Callable, postprocessing: Callable) -> dict:
    """One :func:`case_datalist` entry through the inference config's pieces outside an engine (tools
    and tests); returns the case summary. An error is raised as itself, not wrapped by MONAI."""
    try:
        started = time.perf_counter()
        data = {**preprocessing(dict(case)), "started": started}
        return postprocessing({**data, "pred": inferer(data["image"])})["summary"]
    except RuntimeError as err:
        cause = _unwrapped(err)
        if cause is err:
            raise
        raise cause from None


def _failure_text(failure: dict) -> str:
    """"<file>: <reason>" of a failed case (a reason that names the file already is kept as it is)."""
    return failure["error"] if failure["input"] in failure["error"] else f"{failure['input']}: {failure['error']}"


class CaseReport:
    """Ignite handler of the inference evaluator: collects each case's summary, skip or failure (logged
    as it happens) and on completion writes ``<output_dir>/summary.json`` = ``{"cases": [summaries,
    done or skipped], "skipped": [case ids], "failed": [{"input", "error"}]}``; then raises
    :class:`~scripts.cli.BatchError` listing every failure, if any."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        self.report: dict = {"cases": [], "skipped": [], "failed": []}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine: Engine) -> None:
        self.report = {"cases": [], "skipped": [], "failed": []}

    def record(self, engine: Engine) -> None:
        case = engine.state.output
        if "skipped" in case:
            self.report["cases"].append(json.loads(Path(case["skipped"]).read_text()))
            self.report["skipped"].append(case["case"])
            logger.info("%s: skipped, results exist in %s (--overwrite true redoes them)", case["case"],
                        Path(case["skipped"]).parent)
        elif "error" in case:
            self.report["failed"].append({"input": case["input"], "error": case["error"]})
            logger.error("%s", _failure_text(self.report["failed"][-1]))
        else:
            summary = case["summary"]
            self.report["cases"].append(summary)
            logger.info("%s: implant %.2f ml (%.0f %% over the skull's opening) in %.1f s", summary["case_id"],
                        summary["implant_volume_ml"], 100 * summary["implant_open_fraction"],
                        summary["timings_s"]["total"])
        # the case's volumes go before the next case loads, so a batch's memory stays that of one case
        engine.state.batch = engine.state.output = None
        gc.collect()

    def write(self, engine: Engine) -> None:
        index = self.output_dir / "summary.json"
        atomic_write(index, lambda tmp: Path(tmp).write_text(json.dumps(self.report, indent=2)), overwrite=True)
        failed = self.report["failed"]
        if failed:
            total = len(self.report["cases"]) + len(failed)
            raise BatchError(f"{len(failed)} of {total} cases failed (listed in {index}): "
                             + "; ".join(_failure_text(f) for f in failed))
