"""Learning curve of a denoiser training run: held-out DSC and Chamfer against CPU-hours.

For every kept checkpoint in ``<ckpt_dir>/kept/`` (written by a training run with ``--keep_interval N``:
MONAI's saver keeps only the last two numbered checkpoints in ``ckpt_dir``), the EMA weights run the
bundle's inference (DDIM-50, as shipped) on the first ``num_cases`` held-out cases of the quality
study and are scored with ``configs/evaluate.json``; the Chamfer distance is the run's own
``val_chamfer`` (TensorBoard) at the checkpoint's epoch (both read from its trainer state). CPU-hours are iterations x
``seconds_per_iteration`` (default: the 0.3.0 recipe's measured rate on one core, see docs/history/training_notebook.md), because wall time on
a shared machine says little. Writes ``<output_dir>/curve.json`` and prints a markdown table;
``plot`` draws several such curves (DSC and Chamfer against CPU-hours) into one PNG.

    python -m monai.bundle run --config_file "['configs/train_base.json','configs/train_diffusion.json','configs/recipes/denoiser_small.json']" \
        --output_dir runs/denoiser_small --keep_interval 300
    python -m tools.learning_curve score runs/denoiser_small --dataset_dir data/synth128 --output_dir runs/curve_scratch
    python -m tools.learning_curve plot "{'new recipe': 'runs/curve_scratch/curve.json'}" docs/images/learning_curve.png
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from scripts.checkpoints import KEPT_FOLDER, checkpoint_files
from scripts.evaluate import evaluate_predictions
from scripts.io import atomic_write
from scripts.weights import export_weights, read_weights_file
from tools.quality_study import GUARDS_OFF, SETTINGS, _run, held_out_cases

RECIPE = ("configs/train_base.json", "configs/train_diffusion.json", "configs/recipes/denoiser_small.json")


def val_chamfer(run_dir: str | Path) -> dict[int, float]:
    """{training epoch: val_chamfer} from the run's TensorBoard files (MONAI logs validation per epoch)."""
    values = {}
    for events in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events)).Reload()
        if "val_chamfer" in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars("val_chamfer")})
    return values


def score(run_dir: str, dataset_dir: str, output_dir: str, num_cases: int = 10, seconds_per_iteration: float = 1.08,
         every: int = 600, setting: str = "DDIM-50", start_iterations: int = 0, config: str | tuple = RECIPE,
         ckpt_dir: str | None = None) -> str:
    """Score the kept checkpoints of ``run_dir`` whose iteration is a multiple of ``every``.

    ``start_iterations``: iterations already in the run's ``init_weights`` (a warm start), counted
    into its CPU-hours. ``config``: the run's training config(s), for the weights files' recipe.
    ``ckpt_dir``: the run's checkpoint folder, if not ``<run_dir>/checkpoints``."""
    kept = checkpoint_files(Path(ckpt_dir or Path(run_dir) / "checkpoints") / KEPT_FOLDER)
    trainers = [read_weights_file(checkpoint, mmap=True)["trainer"] for checkpoint in kept]  # a refused file stops here
    cases = held_out_cases(dataset_dir, num_cases)
    chamfer_by_epoch = val_chamfer(run_dir)
    rows = []
    for checkpoint, trainer in zip(kept, trainers):
        iteration = int(trainer["iteration"])
        if iteration % every:
            continue
        folder = Path(output_dir) / f"iteration_{iteration}"
        weights = export_weights(checkpoint, folder / "denoiser.pt", config, key="ema_network", overwrite=True)
        _run("inference.json", cases, folder, denoiser_weights=str(weights), stl=False, preview=False,
             progress=False, seed=0, num_samples=1, **SETTINGS[setting], **GUARDS_OFF)
        report = evaluate_predictions(cases, folder, folder / "evaluation")
        mean = {k: v["mean"] for k, v in report["metrics"].items()}
        rows.append({"iteration": iteration, "cpu_hours": (start_iterations + iteration) * seconds_per_iteration / 3600,
                     "dsc": mean["dsc"], "bdsc": mean["bdsc"], "hd95_mm": mean["hd95"],
                     "val_chamfer": chamfer_by_epoch.get(iteration // int(trainer["epoch_length"]))})
        print(rows[-1], flush=True)
    atomic_write(Path(output_dir) / "curve.json", lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=2)),
                 overwrite=True)
    lines = ["| iteration | CPU-hours | DSC | bDSC | HD95 (mm) | val Chamfer (voxels) |", "|---|---|---|---|---|---|"]
    for r in rows:
        chamfer = "-" if r["val_chamfer"] is None else f"{r['val_chamfer']:.2f}"
        lines.append(f"| {r['iteration']} | {r['cpu_hours']:.2f} | {r['dsc']:.3f} | {r['bdsc']:.3f} | "
                     f"{r['hd95_mm']:.2f} | {chamfer} |")
    print("\n".join(lines))
    return "\n".join(lines)


def plot(curves: dict[str, str], out: str, dsc_label: str = "held-out DSC (10 study cases)") -> Path:
    """Draw {label: curve.json} as DSC (axis label ``dsc_label``: which cases, which setting) and val Chamfer
    against CPU-hours into the PNG ``out`` (atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_dsc, ax_chamfer) = plt.subplots(1, 2, figsize=(11, 5.5))
    for label, path in curves.items():
        rows = json.loads(Path(path).read_text())
        scored = [r for r in rows if r.get("dsc") is not None]
        ax_dsc.plot([r["cpu_hours"] for r in scored], [r["dsc"] for r in scored], "o-", label=label)
        measured = [r for r in rows if r.get("val_chamfer") is not None]
        ax_chamfer.plot([r["cpu_hours"] for r in measured], [r["val_chamfer"] for r in measured], "o-", label=label)
    ax_dsc.set(xlabel="CPU-hours (one core)", ylabel=dsc_label, ylim=(0, 1))
    ax_chamfer.set(xlabel="CPU-hours (one core)", ylabel="val Chamfer (voxels, DDIM-20)", yscale="log")
    for ax in (ax_dsc, ax_chamfer):
        ax.grid(alpha=0.3)
    fig.legend(*ax_dsc.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8)  # one legend, below both
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    path = atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110), overwrite=True)
    plt.close(fig)
    return path


if __name__ == "__main__":
    fire.Fire({"score": score, "plot": plot})
