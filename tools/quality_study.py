"""Quality / speed study: every sampler setting and the U-Net baseline on the same held-out cases.

Each setting runs the bundle's own configs (``configs/inference.json`` or
``configs/inference_unet.json``) through ``ConfigWorkflow`` with overrides, then scores the
implants with ``configs/evaluate.json`` (:func:`scripts.evaluate.evaluate_predictions`). A setting
whose ``summary.json`` exists already is scored without running inference again, so an
interrupted study resumes. Prints a markdown table and writes ``<output_dir>/study.json``; with
``--headline_set <name>`` the default setting's row also goes to ``docs/headline_metrics.json``, the one
source of the numbers that metadata.json, README.md and docs/README.md quote (tests/test_bundle.py).

The ``TRUE_POINT_SETTINGS`` replace the diffusion model by points drawn on the true implant's
surface (same number, same condition, voxelizer and post-processing): the score a perfect denoiser
would get, which separates the two networks' shares of the error.

    python -m tools.quality_study --dataset_dir data/synth128 --output_dir runs/study --num_cases 20
    python -m tools.quality_study --dataset_dir data/synth128 --output_dir runs/study --num_cases 20 \
        --settings "DDIM-10 + priors" --headline_set study
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import fire
import numpy as np
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.cases import case_datalist, predict_case
from scripts.data.datalist import datalist
from scripts.data.points import mask_to_surface_points
from scripts.evaluate import evaluate_predictions
from scripts.generator import ImplantGenerator
from scripts.frame import to_canonical
from scripts.io import atomic_write, load_mask

ROOT = Path(__file__).resolve().parents[1]

# the no-defect guards are for users' runs; a study scores what the model made of every case
GUARDS_OFF = {"min_implant_ml": 0.0, "min_open_fraction": 0.0}

# name -> inference.json overrides (explicit, so the table does not change with the config's defaults)
SETTINGS = {
    "DDPM-1000": {"sampler": "ddpm", "steps": 1000},
    "DDIM-1": {"sampler": "ddim", "steps": 1, "eta": 0.0},
    "DDIM-4": {"sampler": "ddim", "steps": 4, "eta": 0.0},
    "DDIM-6": {"sampler": "ddim", "steps": 6, "eta": 0.0},
    "DDIM-8": {"sampler": "ddim", "steps": 8, "eta": 0.0},
    "DDIM-10": {"sampler": "ddim", "steps": 10, "eta": 0.0},
    "DDIM-15": {"sampler": "ddim", "steps": 15, "eta": 0.0},
    "DDIM-25": {"sampler": "ddim", "steps": 25, "eta": 0.0},
    "DDIM-50": {"sampler": "ddim", "steps": 50, "eta": 0.0},
    "DPM++2M-10": {"sampler": "dpmpp_2m", "steps": 10},
    "DPM++2M-20": {"sampler": "dpmpp_2m", "steps": 20},
    "DDIM-25 eta=1": {"sampler": "ddim", "steps": 25, "eta": 1.0},
    "DDIM-50 eta=1": {"sampler": "ddim", "steps": 50, "eta": 1.0},
    "DDIM-25 5-member mean": {"sampler": "ddim", "steps": 25, "eta": 0.0, "num_samples": 5},
    "DDIM-10 5-member mean": {"sampler": "ddim", "steps": 10, "eta": 0.0, "num_samples": 5},
    "DDIM-25 eta=1 5-member mean": {"sampler": "ddim", "steps": 25, "eta": 1.0, "num_samples": 5},
    "DDIM-10 eta=1 5-member mean": {"sampler": "ddim", "steps": 10, "eta": 1.0, "num_samples": 5},
}
# the same with the mirror prior alone and with both priors (configs/inference.json's default since 0.8.0:
# the mirror, or the smooth shell where the mirror covers less than half), their bone as voxels (the
# default since 0.9.0) or through the voxelizer alone ("priors via voxelizer", 0.8.0); the rows above run
# without either. The "+ mirror" rows of 0.7.0 in docs/history/benchmarks_by_version.md were made with 0.7.0's mirror
# (mirrored points seated by a network call), which 0.8.0 replaced
PRIORS_OFF = {"mirror_prior": False, "shell_prior": False}
PRIORS = {"mirror": {"mirror_prior": True, "prior_fill": True},
          "priors": {"mirror_prior": True, "shell_prior": True, "prior_fill": True},
          "priors via voxelizer": {"mirror_prior": True, "shell_prior": True, "prior_fill": False}}
SETTINGS = {name: {**PRIORS_OFF, **setting} for name, setting in SETTINGS.items()}
SETTINGS.update(
    {f"{name} + {label}": {**setting, **priors} for name, setting in list(SETTINGS.items())
     for label, priors in PRIORS.items()}
)
TRUE_POINTS = "True implant points"
# name -> Gaussian noise (voxels per axis) added to the true implant points: how much point noise the
# voxelizer and post-processing tolerate
TRUE_POINT_SETTINGS = {TRUE_POINTS: 0.0, "True implant points + 1 voxel noise": 1.0, "True implant points + 2 voxels noise": 2.0}
UNET = "U-Net baseline"
DEFAULT = "DDIM-10 + priors"  # configs/inference.json's defaults
HEADLINE = ROOT / "docs" / "headline_metrics.json"


def write_headline(path: str | os.PathLike, set_name: str, dataset_dir: str, row: dict, summaries: list[dict],
                   command: str) -> dict:
    """Put the default setting's ``row`` (of :func:`_row`) for the case set ``set_name`` into the headline
    file ``path`` (other sets stay), with the weights' SHA-256 from the case ``summaries``; returns it."""
    if row["setting"] != DEFAULT:
        raise ValueError(f"the headline numbers are the default setting's ({DEFAULT!r}), not {row['setting']!r}")
    headline = json.loads(Path(path).read_text()) if Path(path).is_file() else {"setting": DEFAULT, "sets": {}}
    headline["sets"][set_name] = {
        "dataset_dir": str(dataset_dir), "num_cases": row["cases"], "dsc": round(row["dsc"], 3),
        "bdsc": round(row["bdsc"], 3), "hd95_mm": round(row["hd95_mm"], 2),
        "weights_sha256": summaries[0]["weights"], "command": command,
    }
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(headline, indent=2) + "\n"), overwrite=True)
    return headline


def true_implant_points(implant_file: str | os.PathLike, cube_affine: np.ndarray, side: int, num_points: int,
                        seed: int = 0) -> np.ndarray:
    """(num_points, 3) Poisson-disk points on the true implant's surface (a mask on the defective skull's
    grid), in voxel coords of the canonical cube (``cube_affine``, ``side``) the skull is resampled to."""
    cube = to_canonical(load_mask(implant_file), cube_affine, side)
    return mask_to_surface_points(np.asarray(cube[0]) > 0, num_points, seed=seed)


class TruePointsGenerator(ImplantGenerator):
    """:class:`ImplantGenerator` whose "generated" points are num_target Poisson-disk points on the
    true implant's surface (file ``truth``, set before each case, on the defective skull's grid) instead
    of diffusion samples, moved by Gaussian noise of ``noise_vox`` voxels per axis (seeded). Every member
    gets the same implant points with its own condition draw."""

    truth: str | None = None
    noise_vox: float = 0.0
    cube_affine: np.ndarray | None = None

    def __call__(self, inputs, network=None) -> dict:
        self.cube_affine = np.asarray(inputs.affine, dtype=np.float64)  # the canonical cube of this case
        return super().__call__(inputs, network)

    def complete_points(self, defective: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Defective cube mask (X, Y, Z) -> clouds (K, N, 3) and their implant part (K, num_target, 3), voxel coords."""
        target = true_implant_points(self.truth, self.cube_affine, defective.shape[0], self.num_target, self.seed)
        target = target + np.random.default_rng(self.seed).normal(0.0, self.noise_vox, target.shape)
        conditions = self.condition_points(defective)[0]  # the members' skull points (K, Nc, 3)
        clouds = np.concatenate([conditions, np.broadcast_to(target, (len(conditions), *target.shape))], axis=1)
        clouds = clouds.astype(np.float32)
        self.diffusion.last_model_calls = 0
        return clouds, clouds[:, self.num_condition :]


def held_out_cases(dataset_dir: str | os.PathLike, num_cases: int, dataset: str = "skullbreak",
                   split_file: str | os.PathLike | None = None, split: str = "test") -> list[dict]:
    """The first ``num_cases`` entries of ``split`` ("validation", "test" or "all": a generator seed that nothing
    trained on) of ``split_file`` (None: the split made from the ids on disk), skull by skull, all defect classes
    of each."""
    cases = datalist(dataset, dataset_dir, split, split_file)[:num_cases]
    if len(cases) < num_cases:
        raise ValueError(f"{dataset_dir}: the {split} split has only {len(cases)} cases, {num_cases} requested")
    return cases


def _workflow(config: str, **overrides) -> ConfigWorkflow:
    """The bundle's ``configs/<config>`` as an initialised inference workflow with ``overrides``."""
    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs" / config), meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=False, workflow_type="infer", bundle_root=str(ROOT), **overrides,
    )
    workflow.initialize()
    return workflow


def _run(config: str, cases: list[dict], out: Path, **overrides) -> list[dict]:
    """Run one inference config on ``cases`` into ``out`` unless it finished before; returns the case summaries."""
    summary = out / "summary.json"
    if not summary.is_file():
        workflow = _workflow(config, input=cases, output_dir=str(out), **overrides)
        workflow.run()
        workflow.finalize()
    written = json.loads(summary.read_text())
    return written["cases"] if isinstance(written, dict) else written  # inference.json's report / the U-Net's list


def _run_true_points(cases: list[dict], out: Path, noise_vox: float = 0.0, **overrides) -> list[dict]:
    """A TRUE_POINT_SETTINGS setting: configs/inference.json with :class:`TruePointsGenerator`, case by case."""
    summary = out / "summary.json"
    if not summary.is_file():
        workflow = _workflow("inference.json", output_dir=str(out), stl=False, preview=False,
                             **{"inferer#_target_": f"{__name__}.TruePointsGenerator", **overrides})
        generator, preprocessing, postprocessing = (workflow.parser.get_parsed_content(k) for k in
                                                    ("inferer", "preprocessing", "postprocessing"))
        summaries = []
        generator.noise_vox = noise_vox
        for case, entry in zip(cases, case_datalist(cases)):
            generator.truth = case["implant"]
            summaries.append(predict_case(entry, preprocessing, generator, postprocessing))
        atomic_write(summary, lambda tmp: Path(tmp).write_text(json.dumps(summaries, indent=2)), overwrite=True)
    return json.loads(summary.read_text())


def guard_stops(summaries: list[dict]) -> list[str]:
    """The cases that configs/inference.json's no-defect guards (at their defaults) would have stopped:
    implant below ``min_implant_ml`` or less of it than ``min_open_fraction`` over an opening. The study
    runs with the guards off, so that it scores what the model made of every case."""
    config = ConfigParser()
    config.read_config(str(ROOT / "configs" / "inference.json"))
    min_ml, min_open = float(config["min_implant_ml"]), float(config["min_open_fraction"])
    return [s["case_id"] for s in summaries
            if s["implant_volume_ml"] < min_ml or s.get("implant_open_fraction", 1.0) < min_open]


def _row(name: str, report: dict, summaries: list[dict], calls: int | None) -> dict:
    """One table row: mean metrics (and per defect class) from the evaluation report, the most network calls
    a case took (the summaries' count where they have one, else ``calls``), mean seconds per case, and the cases the no-defect guards would have stopped."""
    calls = max((s.get("network_calls", calls) for s in summaries), default=calls)
    mean = {k: v["mean"] for k, v in report["metrics"].items()}
    return {
        "setting": name, "network_calls": calls, "cases": report["num_cases"],
        "dsc": mean["dsc"], "bdsc": mean["bdsc"], "hd95_mm": mean["hd95"],
        "seconds_per_case": float(np.mean([s["timings_s"]["total"] for s in summaries])),
        "dsc_per_defect": {d: part["metrics"]["dsc"]["mean"] for d, part in report["per_defect"].items()},
        "guard_stops": guard_stops(summaries),
    }


def _markdown(rows: list[dict]) -> str:
    lines = ["| setting | network calls | cases | DSC | bDSC | HD95 (mm) | s / case |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        calls = "-" if r["network_calls"] is None else str(r["network_calls"])
        lines.append(f"| {r['setting']} | {calls} | {r['cases']} | {r['dsc']:.3f} | {r['bdsc']:.3f} | "
                     f"{r['hd95_mm']:.2f} | {r['seconds_per_case']:.1f} |")
    return "\n".join(lines)


def main(dataset_dir: str, output_dir: str = "runs/study", num_cases: int = 20, settings: str | None = None,
         unet_weights: str | None = None, unet_overrides: dict | None = None, seed: int = 0,
         headline_set: str | None = None, split_file: str | None = None, split: str = "test", **overrides) -> str:
    """Run the study; ``settings``: comma-separated names of SETTINGS or TRUE_POINT_SETTINGS (default: all
    SETTINGS), plus the U-Net row when ``unet_weights`` is given (``unet_overrides`` go to
    configs/inference_unet.json, e.g. ``{'working_size': 64}``). ``overrides`` go to
    configs/inference.json (e.g. preset); the no-defect guards are off unless set there (see :func:`guard_stops`).
    ``headline_set``: write the DEFAULT row to HEADLINE under this case-set name (:func:`write_headline`).
    ``split_file`` / ``split``: which cases (:func:`held_out_cases`; default the test split made from the ids)."""
    if headline_set is not None and (overrides or seed != 0):
        raise ValueError("headline numbers come from the default configs: no overrides, seed 0")
    overrides = {**GUARDS_OFF, **overrides}
    cases = held_out_cases(dataset_dir, num_cases, split_file=split_file, split=split)
    names = list(SETTINGS) if settings is None else [s.strip() for s in settings.split(",")]
    unknown = [n for n in names if n not in SETTINGS and n not in TRUE_POINT_SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; choose from {list(SETTINGS) + list(TRUE_POINT_SETTINGS)}")
    out = Path(output_dir)
    rows = []
    for name in names:
        folder = out / name.replace("+", "p").replace(" ", "_")
        start = time.perf_counter()
        if name in TRUE_POINT_SETTINGS:
            summaries = _run_true_points(cases, folder, TRUE_POINT_SETTINGS[name], progress=False, seed=seed,
                                         **PRIORS_OFF, **overrides)
            setting = {"num_samples": 1, "steps": 0}
        else:
            setting = {"num_samples": 1, **SETTINGS[name]}
            summaries = _run("inference.json", cases, folder, stl=False, preview=False, progress=False, seed=seed,
                             **setting, **overrides)
        score = "implant_mean" if setting["num_samples"] > 1 else "implant"
        report = evaluate_predictions(cases, folder, folder / "evaluation", prediction_name=score)
        rows.append(_row(name, report, summaries, setting["steps"]))
        if headline_set is not None and name == DEFAULT:
            command = (f"python -m tools.quality_study --dataset_dir {dataset_dir} --num_cases {num_cases} "
                       f"--settings {shlex.quote(DEFAULT)} --headline_set {shlex.quote(headline_set)}"
                       + (f" --split_file {split_file}" if split_file else "")
                       + (f" --split {split}" if split != "test" else ""))
            write_headline(HEADLINE, headline_set, dataset_dir, rows[-1], summaries, command)
        print(f"{name}: {rows[-1]} ({time.perf_counter() - start:.0f} s)", flush=True)
    if unet_weights:
        folder = out / "unet"
        summaries = _run("inference_unet.json", cases, folder, weights=str(unet_weights), **(unet_overrides or {}))
        report = evaluate_predictions(cases, folder, folder / "evaluation")
        rows.append(_row(UNET, report, summaries, 1))
    atomic_write(out / "study.json", lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=2)), overwrite=True)
    table = _markdown(rows)
    print(table)
    return table


if __name__ == "__main__":
    fire.Fire(main)
