"""One prepared device run: CUDA correctness, the bundle job, paper-scale cost, training throughput.

Writes ``device_check.json`` (the report, rewritten after every section) and ``device_check.log``
into ``--out`` (default ``$OUT``). Sections (``--sections``; all by default), each recorded with its
status (ok / failed / skipped), wall time and rows:

- ``ops``: every PVCNN op on ``--device`` against the CPU. The ops pick their path by device (torch
  on CUDA, KD-tree / numpy on the CPU), so a ``--device cpu`` run compares the torch path with the
  CPU path;
- ``pvcnn2``: a PVCNN2 forward per preset, same weights and input, device against CPU;
- ``dpsr``: the DPSR indicator, device against CPU;
- ``ddim``: one DDIM step of ``ConditionalDiffusion`` (network call + MONAI's scheduler step);
- ``bundle``: ``configs/inference.json`` on the shipped sample with ``--device``, compared with the
  CPU run and the sample's true implant;
- ``cost``: one synthetic case per sampler and ensemble size, untrained networks: wall time, peak
  GPU memory and peak host memory of diffusion, voxelization and post-processing;
- ``train``: iterations/s of the bundle's diffusion training step under DDP, one torchrun process.

Correctness runs with TF32 off (float32 arithmetic on both sides); cost and training keep torch's
defaults, as users run them. ``--tiny`` shrinks every size so that a 2-core CPU finishes in about
a minute (CI runs it); ``prepare`` (through ``tools/device_check.sh prepare``) stores the cost case
and draws the condition points (Open3D) ahead, for a machine without Open3D.

    bash tools/device_check.sh                   # on the GPU machine: full sizes, --device cuda
    python -m tools.device_check --device cpu --tiny --out /tmp/device_check
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from tools.benchmark_denoiser import synthetic_input
from tools.benchmark_dpsr import sphere_cloud
from scripts.networks.dpsr import DPSR
from scripts.networks.pvcnn2 import PRESETS, PVCNN2Denoiser
from scripts.networks.pvcnn_ops import (
    avg_voxelize,
    ball_query,
    furthest_point_sample,
    group,
    three_nn,
    three_nn_interpolate,
    trilinear_devoxelize,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = ROOT / ".device" / "conditions.npz"
logger = logging.getLogger("device_check")

# Sizes per profile. "full" is what a GPU user runs (paper scale); "tiny" is the CPU dry run.
PROFILES = {
    "full": dict(
        ops=dict(batch=2, points=30720, condition=27648, centers=10240, radius=0.1, neighbors=128, channels=64,
                 resolution=32),
        pvcnn2=dict(presets=("small", "paper"), batch=2),
        dpsr=dict(res=128, points=215040),
        ddim=dict(preset="paper", batch=2, steps=50),
        bundle=dict(overrides={}, timeout_s=300),  # subprocess timeouts: a hang fails its section only
        cost=dict(preset="paper", size=512, settings=(("ddim", 50), ("dpmpp_2m", 20)), members=(1, 5)),
        train=dict(batches={"small": (32, 128), "paper": (8, 32)}, warmup=3, iterations=10, timeout_s=300),
    ),
    "tiny": dict(
        ops=dict(batch=2, points=2048, condition=1792, centers=512, radius=0.4, neighbors=16, channels=16,
                 resolution=8),
        pvcnn2=dict(presets=("tiny", "small"), batch=2),
        dpsr=dict(res=32, points=4096),
        ddim=dict(preset="tiny", batch=2, steps=50),
        bundle=dict(overrides={"steps": 2, "stl": False, "preview": False}, timeout_s=None),
        cost=dict(preset="tiny", size=48, settings=(("ddim", 2), ("dpmpp_2m", 2)), members=(1, 2)),
        train=dict(batches={"tiny": (2,)}, warmup=1, iterations=2, timeout_s=None),
    ),
}

# Tolerances. Index outputs (sampling, neighbour search) must match exactly: both paths use the same
# float32 formula. rel_l2 = ||device - cpu|| / ||cpu|| in float64; float32 with another summation
# order lands near 1e-7 per op. Voxelization rounds coordinates whose mean / norm are reduced in
# another order, so a point on a voxel boundary can change voxels: looser for it and for whole networks.
EXACT = 0.0
TOL_OP = 1e-5
TOL_VOXELIZE = 1e-3
TOL_NETWORK = 1e-3
TOL_DPSR = 1e-4
TOL_SIGN = 1e-4  # fraction of DPSR grid nodes whose inside / outside label differs
# Bundle job: CUDA draws its own noise stream from the seed, so the two implants are two samples of
# one model; their DSC to the true implant must agree within this.
TOL_BUNDLE_DSC = 0.1
# Paper training recipe: 15,000 epochs at batch 8 (REFERENCE.md).
PAPER_ITERATIONS = 795_000
TARGET_IMPLANT_S = 30.0
TARGET_ENSEMBLE_RATIO = 1.5

# Modules a section needs beyond torch / numpy / scipy (the GPU image has no monai, ignite,
# nibabel, pynrrd or fire; tools/device_check.sh installs the wheels that `prepare` downloads).
NEEDS = {
    "ops": (), "pvcnn2": (), "dpsr": (), "ddim": ("monai", "tqdm"),
    "bundle": ("monai", "ignite", "nibabel", "nrrd", "fire", "skimage", "matplotlib", "tqdm"),
    "cost": ("monai", "nibabel", "nrrd", "skimage", "matplotlib", "tqdm"), "train": ("monai", "ignite", "tqdm"),
}
SECTIONS = tuple(NEEDS)


# ----------------------------------------------------------------------------- measuring


def _rel_l2(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double().cpu(), out.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _close(check: str, ref: torch.Tensor, out: torch.Tensor, tol: float, **extra) -> dict:
    value = _rel_l2(ref, out)
    return {"check": check, "metric": "rel_l2", "value": value, "tolerance": tol, "passed": value <= tol, **extra}


def _match(check: str, ref: torch.Tensor, out: torch.Tensor, tol: float = EXACT, **extra) -> dict:
    value = float((ref.cpu() != out.cpu()).double().mean())
    return {"check": check, "metric": "mismatch_fraction", "value": value, "tolerance": tol, "passed": value <= tol,
            **extra}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _host_peak_gib() -> float:
    """Peak resident memory of this process (VmHWM) in GiB since the last :func:`_reset_host_peak`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_host_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextmanager
def _stage(record: dict, name: str, device: torch.device):
    """Time the block into ``record``: ``<name>_s``, ``<name>_gpu_peak_gib`` (CUDA), ``<name>_host_peak_gib``."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if not _reset_host_peak():
        record["host_peak_scope"] = "process lifetime (clear_refs refused)"
    start = time.perf_counter()
    yield
    _sync(device)
    record[f"{name}_s"] = round(time.perf_counter() - start, 3)
    record[f"{name}_gpu_peak_gib"] = (round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                                      if device.type == "cuda" else None)
    record[f"{name}_host_peak_gib"] = round(_host_peak_gib(), 3)


@contextmanager
def _float32_exact():
    """TF32 off for matmuls and convolutions in the block (correctness checks)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------- correctness


def check_ops(p: dict, device: torch.device, **_) -> list[dict]:
    """Each PVCNN op on ``device`` against the CPU, on a synthetic skull-like cloud."""
    def on(t: torch.Tensor) -> torch.Tensor:
        return t.to(device)

    backend = "auto" if device.type != "cpu" else "torch"
    x = synthetic_input(p["batch"], p["points"], p["condition"])  # (B, 3, N)
    xyz = x.transpose(1, 2).contiguous()
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(p["batch"], p["channels"], p["points"], generator=g)
    center_feats = torch.randn(p["batch"], p["channels"], p["centers"], generator=g)
    m, r, k, res = p["centers"], p["radius"], p["neighbors"], p["resolution"]
    shape = {"batch": p["batch"], "points": p["points"]}

    idx = furthest_point_sample(xyz, m)
    rows = [_match("furthest_point_sample", idx, furthest_point_sample(on(xyz), m, backend), centers=m, **shape)]
    centers = group(x, idx.unsqueeze(2)).squeeze(3).transpose(1, 2).contiguous()  # (B, M, 3)
    nbr = ball_query(centers, xyz, r, k)
    rows.append(_match("ball_query", nbr, ball_query(on(centers), on(xyz), r, k, backend), radius=r, k=k, **shape))
    rows.append(_close("group", group(feats, nbr), group(on(feats), on(nbr)), EXACT, **shape))
    nn_idx, nn_d = three_nn(xyz, centers)
    nn_idx_d, nn_d_d = three_nn(on(xyz), on(centers), backend)
    rows += [_match("three_nn indices", nn_idx, nn_idx_d, **shape),
             _close("three_nn distances", nn_d, nn_d_d, TOL_OP, **shape)]
    rows.append(_close("three_nn_interpolate", three_nn_interpolate(xyz, centers, center_feats),
                       three_nn_interpolate(on(xyz), on(centers), on(center_feats), backend), TOL_OP, **shape))
    grid, norm = avg_voxelize(feats, x, res)
    grid_d, norm_d = avg_voxelize(on(feats), on(x), res)
    rows += [_close("normalize_voxel_coords", norm, norm_d, TOL_OP, resolution=res, **shape),
             _close("avg_voxelize", grid, grid_d, TOL_VOXELIZE, resolution=res, **shape)]
    rows.append(_close("trilinear_devoxelize", trilinear_devoxelize(grid, norm, res),
                       trilinear_devoxelize(on(grid), on(norm), res), TOL_OP, resolution=res, **shape))
    return rows


def _timed_forward(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, device: torch.device):
    """Call twice -> (output, seconds of the second call)."""
    model(x, t)
    _sync(device)
    start = time.perf_counter()
    out = model(x, t)
    _sync(device)
    return out, time.perf_counter() - start


@torch.no_grad()
def check_pvcnn2(p: dict, device: torch.device, **_) -> list[dict]:
    """PVCNN2 forward (eval) per preset on ``device`` against the CPU: same weights, same input."""
    rows = []
    for preset in p["presets"]:
        torch.manual_seed(0)
        model = PVCNN2Denoiser(preset).eval()
        cfg = model.config
        x = synthetic_input(p["batch"], cfg["num_points"], cfg["num_condition"])
        t = torch.linspace(999, 0, p["batch"]).long()
        ref, cpu_s = _timed_forward(model, x, t, torch.device("cpu"))
        out, dev_s = _timed_forward(copy.deepcopy(model).to(device), x.to(device), t.to(device), device)
        rows.append(_close(f"PVCNN2 forward ({preset})", ref, out, TOL_NETWORK, preset=preset, batch=p["batch"],
                           points=cfg["num_points"], forward_cpu_s=round(cpu_s, 3), forward_device_s=round(dev_s, 3)))
    return rows


@torch.no_grad()
def check_dpsr(p: dict, device: torch.device, **_) -> list[dict]:
    """DPSR indicator on ``device`` against the CPU (oriented points on a sphere)."""
    points, normals = sphere_cloud(p["points"])
    dpsr = DPSR(p["res"])
    ref = dpsr(points, normals)
    out = dpsr(points.to(device), normals.to(device))
    shape = {"res": p["res"], "points": p["points"]}
    return [_close("DPSR indicator", ref, out, TOL_DPSR, **shape),
            _match("DPSR inside mask (indicator <= 0)", ref <= 0, out <= 0, TOL_SIGN, **shape)]


@torch.no_grad()
def check_ddim(p: dict, device: torch.device, **_) -> list[dict]:
    """One DDIM step (first of ``steps``, trailing spacing): denoiser call + MONAI scheduler step."""
    from scripts.diffusion.process import ConditionalDiffusion
    from scripts.diffusion.samplers import strided_timesteps

    torch.manual_seed(0)
    model = PVCNN2Denoiser(p["preset"]).eval()
    diffusion = ConditionalDiffusion()
    diffusion.ddim.set_timesteps(p["steps"])
    t = strided_timesteps(diffusion.num_timesteps, p["steps"])[0]
    nc = model.config["num_condition"]
    x = synthetic_input(p["batch"], model.config["num_points"], nc)

    def step(net: torch.nn.Module, cloud: torch.Tensor) -> torch.Tensor:
        out = net(cloud, torch.full((cloud.shape[0],), t, device=cloud.device))[:, :, nc:]
        return diffusion.ddim.step(out, t, cloud[:, :, nc:])[0]

    ref = step(model, x)
    out = step(copy.deepcopy(model).to(device), x.to(device))
    return [_close(f"DDIM step t={t} of {p['steps']} ({p['preset']})", ref, out, TOL_NETWORK, preset=p["preset"],
                   batch=p["batch"])]


# ----------------------------------------------------------------------------- bundle job


def _sample_nifti(work: Path) -> Path:
    """The shipped sample as NIfTI: .nrrd output needs ITK (not in the GPU image), NIfTI only nibabel."""
    from scripts.io import load_mask, save_mask

    img = load_mask(ROOT / "sample" / "defective_skull.nrrd")
    return save_mask(work / "sample.nii.gz", img[0], reference=img, overwrite=True)


def run_bundle(device: str, sample: Path, output_dir: Path, cache: Path, overrides: dict,
               timeout_s: float | None = None) -> dict:
    """``python -m monai.bundle run --config_file configs/inference.json`` on ``sample`` -> its summary.json.

    The generator is :class:`tools.condition_cache.CachedConditionGenerator` (the condition points
    come from ``cache`` where it holds them); every other setting is the config's.
    """
    args = {"input": str(sample), "output_dir": str(output_dir), "device": device, "overwrite": True,
            "progress": False, "inferer#_target_": "tools.condition_cache.CachedConditionGenerator",
            "inferer#condition_cache": str(cache), **overrides}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(ROOT / "configs" / "inference.json")]
    for key, value in args.items():
        cmd += [f"--{key}", str(value)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode:
        raise RuntimeError(f"bundle job on {device} failed:\n{proc.stderr[-4000:]}")
    summary = json.loads((output_dir / "sample" / "summary.json").read_text())
    return {**summary, "wall_s": round(time.perf_counter() - start, 2)}


def check_bundle(p: dict, device: torch.device, work: Path, cache: Path, **_) -> list[dict]:
    """The bundle's inference on the shipped sample on ``device`` and on the CPU; implants compared."""
    from scripts.io import load_mask
    from scripts.metrics import dice

    sample = _sample_nifti(work)
    truth = np.asarray(load_mask(ROOT / "sample" / "implant_ground_truth.nrrd")[0]) > 0
    runs = {}
    for dev in dict.fromkeys([str(device), "cpu"]):
        output_dir = work / f"bundle_{dev.replace(':', '_')}"
        summary = run_bundle(dev, sample, output_dir, cache, p["overrides"], p["timeout_s"])
        implant = np.asarray(load_mask(output_dir / "sample" / "implant.nii.gz")[0]) > 0
        runs[dev] = {"implant": implant, "row": {
            "check": f"bundle job ({dev})", "device": dev, "implant_voxels": summary["implant_voxels"],
            "dsc_to_truth": round(float(dice(implant, truth)), 4), "timings_s": summary["timings_s"],
            "wall_s": summary["wall_s"]}}
    dev_run, cpu_run = runs[str(device)], runs["cpu"]
    gap = abs(dev_run["row"]["dsc_to_truth"] - cpu_run["row"]["dsc_to_truth"])
    compare = {"check": f"bundle job: {device} implant vs cpu implant", "metric": "dsc_to_truth_difference",
               "value": round(gap, 4), "tolerance": TOL_BUNDLE_DSC, "passed": gap <= TOL_BUNDLE_DSC,
               "dice_device_vs_cpu": round(float(dice(dev_run["implant"], cpu_run["implant"])), 4),
               "reference": "the same run (device is the CPU)" if len(runs) == 1 else "CPU run, same machine"}
    return [run["row"] for run in runs.values()] + [compare]


# ----------------------------------------------------------------------------- paper-scale cost


def cost_case(size: int, margin: int, cache: Path) -> dict[str, np.ndarray]:
    """Synthetic SkullBreak-like case (bilateral defect) padded as the inference pads it:
    "defective", "complete", "implant" bool cubes (S, S, S), S = size + 2 * margin.

    Read from (or written to) ``cost_case_<size>_<margin>.npz`` beside ``cache``: the skull is built
    from floating-point fields, so another machine's maths library could move a boundary voxel, and
    cached condition points are keyed by the mask's exact bits.
    """
    path = cache.with_name(f"cost_case_{size}_{margin}.npz")
    side = size + 2 * margin
    if path.is_file():
        with np.load(path) as stored:
            return {k: np.unpackbits(stored[k], count=side**3).view(bool).reshape(side, side, side) for k in stored}
    from monai.data import MetaTensor

    from scripts.data.resample import pad_to_cube
    from scripts.data.synthetic import skullbreak_case

    case = skullbreak_case(0, size=size, seed=1000)
    defective, implant = case.defect("bilateral")

    def cube(mask: np.ndarray) -> np.ndarray:
        return np.asarray(pad_to_cube(MetaTensor(torch.from_numpy(mask[None]), affine=case.affine), side)[0]) > 0

    masks = {"defective": cube(defective), "complete": cube(defective | implant), "implant": cube(implant)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{k: np.packbits(v) for k, v in masks.items()})
    return masks


def cost_generator(preset: str, device: torch.device | str, cache: Path, **kwargs):
    """The inference generator with untrained ``preset`` networks (timing does not depend on weights)."""
    from scripts.diffusion.process import ConditionalDiffusion
    from scripts.networks.sap import SAPVoxelizer
    from tools.condition_cache import CachedConditionGenerator

    torch.manual_seed(0)
    cfg = PRESETS[preset]
    return CachedConditionGenerator(
        PVCNN2Denoiser(preset), SAPVoxelizer(preset), ConditionalDiffusion(clip_x0=4.0), cfg["num_condition"],
        cfg["num_points"] - cfg["num_condition"], device=device, progress=False, condition_cache=cache, **kwargs)


def check_cost(p: dict, device: torch.device, cache: Path, **_) -> list[dict]:
    """Per sampler and ensemble size: diffusion and voxelization of the inference generator (untrained
    networks), then post-processing of a good model's output (the true complete skull as every
    member's indicator, 3,072 random voxels of the true implant as its points: untrained networks fill
    the grid, which makes post-processing far slower than in use). Post-processing does not depend on
    the sampler and is measured once per ensemble size."""
    from scripts.implant import postprocess_ensemble

    warm = cost_generator(p["preset"], device, cache, sampler="ddim", steps=1)  # CUDA context, kernels, cuDNN
    case = cost_case(p["size"], warm.margin, cache)
    indicator = np.where(case["complete"], -1.0, 1.0).astype(np.float32)
    implant_voxels = np.argwhere(case["implant"]).astype(np.float32)
    rng = np.random.default_rng(0)
    warm.indicators(warm.complete_points(case["defective"])[0], case["defective"].shape)
    post = {}
    rows = []
    for sampler, steps in p["settings"]:
        for k in p["members"]:
            gen = cost_generator(p["preset"], device, cache, sampler=sampler, steps=steps, num_samples=k)
            row = {"preset": p["preset"], "grid": case["defective"].shape[0], "sampler": sampler, "steps": steps,
                   "members": k}
            with _stage(row, "diffusion", device):
                clouds, _ = gen.complete_points(case["defective"])
            with _stage(row, "voxelization", device):
                gen.indicators(clouds, case["defective"].shape)
            if k not in post:
                post[k] = {}
                few = len(implant_voxels) < gen.num_target
                points = np.stack([rng.choice(implant_voxels, gen.num_target, replace=few) for _ in range(k)])
                with _stage(post[k], "postprocessing", torch.device("cpu")):
                    postprocess_ensemble(np.broadcast_to(indicator, (k, *indicator.shape)), case["defective"],
                                         points, gen.dilate, gen.max_distance_vox)
            row.update(post[k])
            row["total_s"] = round(row["diffusion_s"] + row["voxelization_s"] + row["postprocessing_s"], 3)
            rows.append(row)
            logger.info("cost %s", row)
    return rows


# ----------------------------------------------------------------------------- training


def check_train(p: dict, device: torch.device, work: Path, **_) -> list[dict]:
    """Training throughput under ``torchrun --standalone --nproc_per_node 1`` (see :func:`train_worker`)."""
    spec = work / "train.json"
    spec.write_text(json.dumps({"batches": p["batches"], "warmup": p["warmup"], "iterations": p["iterations"]}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "tools.device_check", "--train-worker", str(spec)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=p["timeout_s"])
    if proc.returncode:
        raise RuntimeError(f"torchrun failed:\n{proc.stderr[-4000:]}")
    return json.loads(spec.read_text())["rows"]


def train_worker(spec_path: str) -> None:
    """Inside torchrun: the bundle's DDP set-up and ``DiffusionTrainStep`` on synthetic batches; writes
    iterations/s per (preset, batch) into the spec file as "rows"."""
    import torch.distributed as dist

    from scripts.diffusion.process import ConditionalDiffusion
    from scripts.distributed import distributed_model, init_distributed
    from scripts.engines import DiffusionTrainStep

    spec = json.loads(Path(spec_path).read_text())
    device = init_distributed()
    step = DiffusionTrainStep(ConditionalDiffusion())
    rows = []
    for preset, batches in spec["batches"].items():
        cfg = PRESETS[preset]
        for batch in batches:
            row = {"preset": preset, "batch": batch, "device": str(device), "backend": dist.get_backend(),
                   "world_size": dist.get_world_size(), "iterations": spec["iterations"]}
            try:
                torch.manual_seed(0)
                network = distributed_model(PVCNN2Denoiser(preset), device)
                engine = SimpleNamespace(network=network, state=SimpleNamespace(device=device),
                                         optimizer=torch.optim.Adam(network.parameters(), lr=2e-4, betas=(0.5, 0.999)))
                cloud = synthetic_input(batch, cfg["num_points"], cfg["num_condition"]).transpose(1, 2)
                data = {"condition": cloud[:, : cfg["num_condition"]], "target": cloud[:, cfg["num_condition"]:]}
                for _ in range(spec["warmup"]):
                    step(engine, data)
                times = []
                with _stage(row, "train", device):
                    for _ in range(spec["iterations"]):
                        start = time.perf_counter()
                        loss = step(engine, data)["loss"]
                        _sync(device)
                        times.append(time.perf_counter() - start)
                row.update(it_s=round(spec["iterations"] / row["train_s"], 3), loss_finite=bool(torch.isfinite(loss)),
                           median_iteration_s=round(statistics.median(times), 4))
                if preset == "paper":
                    row["gpu_hours_paper_recipe"] = round(PAPER_ITERATIONS / row["it_s"] / 3600, 1)
            except torch.cuda.OutOfMemoryError as err:
                row["error"] = f"out of memory: {str(err).splitlines()[0]}"
                torch.cuda.empty_cache()
            rows.append(row)
    if dist.get_rank() == 0:
        Path(spec_path).write_text(json.dumps({**spec, "rows": rows}))
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- report

CHECKS = {"ops": check_ops, "pvcnn2": check_pvcnn2, "dpsr": check_dpsr, "ddim": check_ddim, "bundle": check_bundle,
          "cost": check_cost, "train": check_train}


def run_section(name: str, params: dict, **context) -> dict:
    """One section -> {"status": ok / failed / skipped, "wall_s", "rows" or "reason" / "error"}."""
    missing = [m for m in NEEDS[name] if importlib.util.find_spec(m) is None]
    if missing:
        return {"status": "skipped", "reason": f"not installed: {', '.join(missing)}"}
    start = time.perf_counter()
    try:
        correctness = name in ("ops", "pvcnn2", "dpsr", "ddim")
        with _float32_exact() if correctness else nullcontext():
            rows = CHECKS[name](params, **context)
    except Exception as err:  # noqa: BLE001 - a failed section is reported, the next one still runs
        logger.error("%s failed:\n%s", name, traceback.format_exc())
        return {"status": "failed", "error": f"{type(err).__name__}: {err}",
                "wall_s": round(time.perf_counter() - start, 2)}
    failed = [r["check"] for r in rows if r.get("passed") is False or "error" in r]
    return {"status": "failed" if failed else "ok", **({"failed_checks": failed} if failed else {}),
            "wall_s": round(time.perf_counter() - start, 2), "rows": rows}


def targets(sections: dict) -> dict:
    """The issue's targets, from the cost and train rows present."""
    out = {}
    cost = sections.get("cost", {}).get("rows", [])
    for sampler in dict.fromkeys(r["sampler"] for r in cost):
        rows = {r["members"]: r for r in cost if r["sampler"] == sampler}
        one, many = rows[min(rows)], rows[max(rows)]
        out[f"{sampler}-{one['steps']}"] = {
            "one_implant_s": one["total_s"], "one_implant_target_s": TARGET_IMPLANT_S,
            "one_implant_met": one["total_s"] <= TARGET_IMPLANT_S,
            f"ensemble_{many['members']}_over_one": round(many["total_s"] / one["total_s"], 2),
            "ensemble_target_ratio": TARGET_ENSEMBLE_RATIO,
            "ensemble_met": many["total_s"] <= TARGET_ENSEMBLE_RATIO * one["total_s"]}
    train = [r for r in sections.get("train", {}).get("rows", []) if "gpu_hours_paper_recipe" in r]
    if train:
        out["paper_training"] = {f"batch_{r['batch']}": {"it_s": r["it_s"], "hours_for_795k_iterations":
                                                         r["gpu_hours_paper_recipe"]} for r in train}
    return out


def environment(device: torch.device, profile: str) -> dict:
    env = {"profile": profile, "device": str(device), "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
           "modules_missing": [m for m in sorted({m for ms in NEEDS.values() for m in ms})
                               if importlib.util.find_spec(m) is None]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env


def _log_to(log_file: Path | None) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    for handler in (logging.FileHandler(log_file), logging.StreamHandler()) if log_file else (logging.StreamHandler(),):
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def prepare(cache: Path, work: Path) -> None:
    """Cache the full profile's cost case and the condition points (Open3D) of it and of the bundle job."""
    p = PROFILES["full"]
    logger.info("bundle job condition points -> %s", cache)
    run_bundle("cpu", _sample_nifti(work), work / "bundle_prepare", cache,
               {"steps": 1, "stl": False, "preview": False})
    logger.info("cost case and its condition points -> %s", cache.parent)
    gen = cost_generator(p["cost"]["preset"], "cpu", cache)
    gen.condition_points(cost_case(p["cost"]["size"], gen.margin, cache)["defective"])


def run_sections(names: list[str], profile: str, device: torch.device, out: Path, work: Path, cache: Path) -> dict:
    """Run the sections in order; the report is rewritten into ``out`` after each one."""
    report = {"environment": environment(device, profile), "sections": {}}
    start = time.perf_counter()
    for name in names:
        logger.info("section %s ...", name)
        report["sections"][name] = result = run_section(name, PROFILES[profile][name], device=device, work=work,
                                                        cache=cache)
        logger.info("section %s: %s (%s s)", name, result["status"], result.get("wall_s", 0))
        report["targets"], report["wall_s"] = targets(report["sections"]), round(time.perf_counter() - start, 1)
        (out / "device_check.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "device_check_out"), help="report folder (default $OUT)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CPU dry run)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="condition-point cache (.npz)")
    parser.add_argument("--prepare", action="store_true", help="only fill --cache for the full profile (needs Open3D)")
    parser.add_argument("--train-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_worker:
        train_worker(args.train_worker)
        return 0
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="device_check_") as work:  # bundle outputs stay out of $OUT
        if args.prepare:
            _log_to(None)
            prepare(Path(args.cache), Path(work))
            return 0
        out.mkdir(parents=True, exist_ok=True)
        _log_to(out / "device_check.log")
        report = run_sections(names, "tiny" if args.tiny else "full", torch.device(args.device), out, Path(work),
                              Path(args.cache))
    for name, result in report["sections"].items():
        detail = result.get("failed_checks") or result.get("error") or result.get("reason") or ""
        print(f"{name:8s} {result['status']:8s} {result.get('wall_s', 0):8.1f} s  {detail}")
    print(json.dumps(report["targets"], indent=1))
    return int(any(r["status"] == "failed" for r in report["sections"].values()))


if __name__ == "__main__":
    sys.exit(main())
