"""Ignite pieces shared by the bundle's trainers: iteration steps, checkpoint resume, DDP set-up.

The trainers themselves are MONAI ``SupervisedTrainer`` / ``SupervisedEvaluator`` engines wired in
``configs/train_*.json``; the functions here are what those engines call every iteration.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.utils import CommonKeys

from scripts.diffusion.chamfer import chamfer_distance

logger = logging.getLogger(__name__)

_CKPT_ITERATION = re.compile(r"iteration=(\d+)\.pt$")
FINAL_CHECKPOINT = "final.pt"
OPTIONAL_CHECKPOINT_OBJECTS = {"lr_scheduler"}  # may be missing from checkpoints of older bundle versions


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Training checkpoints in ckpt_dir: MONAI's ``*iteration=<n>.pt`` in the order of n, then ``final.pt``."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    numbered = [(int(m.group(1)), p) for p in folder.glob("*.pt") if (m := _CKPT_ITERATION.search(p.name))]
    final = folder / FINAL_CHECKPOINT
    return [p for _, p in sorted(numbered, key=lambda item: item[0])] + ([final] if final.is_file() else [])


def _newest_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[str, set[str]] | None:
    """(path, names of the stored objects) of the newest loadable checkpoint in ckpt_dir, or None;
    see :func:`latest_checkpoint`."""
    latest, latest_iteration = None, -1
    for path in checkpoint_files(ckpt_dir):
        try:  # mmap: the zip directory is checked and the trainer state read without loading tensors
            stored = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            iteration = int(stored["trainer"]["iteration"])
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped, not fatal
            logger.warning("skipping unreadable checkpoint %s: %s", path, err)
            continue
        if iteration >= latest_iteration:
            latest, latest_iteration = (str(path), set(stored)), iteration
    return latest


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """Path of the loadable checkpoint in ckpt_dir with the highest stored trainer iteration, or None.

    The iteration is read from the file, not its name, so a ``final.pt`` of an earlier, shorter run
    does not shadow the numbered checkpoints of a longer run continued from it. A run killed while
    writing leaves a truncated file (MONAI's CheckpointSaver does not write atomically); such a file
    is skipped with a warning, so training resumes from the one before.
    """
    newest = _newest_checkpoint(ckpt_dir)
    return newest[0] if newest else None


def resume_handlers(ckpt_dir: str | os.PathLike, load_dict: dict, map_location: str = "cpu") -> list:
    """[CheckpointLoader] for the newest loadable checkpoint in ckpt_dir, or [] for a fresh run.

    load_dict must include the trainer so the iteration/epoch counters resume too.
    A checkpoint written before the configs had an ``lr_scheduler`` resumes without it (the schedule
    restarts, with a warning); any other missing object raises ValueError naming the file.
    """
    newest = _newest_checkpoint(ckpt_dir)
    if newest is None:
        return []
    path, stored = newest
    missing = sorted(set(load_dict) - stored)
    if set(missing) - OPTIONAL_CHECKPOINT_OBJECTS:
        raise ValueError(f"checkpoint {path} lacks {missing} (stored: {sorted(stored)}); it does not belong to "
                         "this training config: move it out of the checkpoint folder to start afresh")
    if missing:
        logger.warning("checkpoint %s lacks %s: resuming without it (its state starts afresh)", path, missing)
    logger.info("resuming from %s", path)
    load = {k: v for k, v in load_dict.items() if k not in missing}
    return [CheckpointLoader(load_path=path, load_dict=load, map_location=map_location)]


def attach_checkpointing(
    trainer,
    ckpt_dir: str | os.PathLike,
    objects: dict,
    interval: int,
    ema=None,
    n_saved: int = 2,
) -> dict:
    """Resume ``trainer`` from the newest loadable checkpoint in ckpt_dir and save every ``interval``
    iterations (plus ``final.pt``); returns the checkpointed objects.

    objects: e.g. {"network": ..., "optimizer": ...}; the trainer (iteration/epoch counters) and,
    with an ignite ``EMAHandler``, its EMA weights are added here: a config cannot reference the
    trainer from inside the trainer's own handler list. Networks are saved DDP-unwrapped; only
    the main process writes.
    """
    objects = {k: unwrap(v) if isinstance(v, torch.nn.Module) else v for k, v in objects.items()}
    objects["trainer"] = trainer
    if ema is not None:
        objects["ema_network"] = ema.ema_model
    for handler in resume_handlers(ckpt_dir, objects):
        handler.attach(trainer)
    if is_main_process():
        os.makedirs(ckpt_dir, exist_ok=True)
        CheckpointSaver(
            save_dir=str(ckpt_dir), save_dict=objects, epoch_level=False, save_interval=interval,
            n_saved=n_saved, save_final=True, final_filename=FINAL_CHECKPOINT,
        ).attach(trainer)
    return objects


def load_weights(network: torch.nn.Module, path: str | os.PathLike, key: str = "network") -> torch.nn.Module:
    """Load a state dict (a bare one, or the ``key`` entry of a training checkpoint) into network.

    Raises FileNotFoundError / ValueError naming the file when it is missing or does not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and key in state and isinstance(state[key], dict):
        state = state[key]
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"weights in {path} do not match the {type(network).__name__} network (wrong preset?): {err}"
        ) from err
    return network


# ----------------------------------------------------------------------------- distributed
def init_distributed() -> torch.device:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU); return this rank's device.

    Idempotent. Raises RuntimeError when the torchrun environment (RANK, WORLD_SIZE, ...) is missing.
    """
    missing = [k for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not dist.is_initialized():
        raise RuntimeError(
            f"init_distributed: environment variables {missing} are not set; launch multi-GPU training with "
            "`torchrun --nproc_per_node <N> -m monai.bundle run ...`"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device(f"cuda:{local_rank}")
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def is_main_process() -> bool:
    """True on rank 0 or when not distributed (only the main process writes logs/checkpoints)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def distributed_model(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Wrap network in DistributedDataParallel on device (device_ids only for CUDA)."""
    network = network.to(device)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=ids)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DDP wrapper (for saving weights that load without DDP)."""
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


# ----------------------------------------------------------------------------- diffusion steps
def points_batch(batch: dict, device: torch.device, condition_key: str, target_key: str) -> torch.Tensor:
    """Condition (B, Nc, 3) and target (B, Nt, 3) -> model layout (B, 3, Nc + Nt), condition first."""
    cloud = torch.cat([batch[condition_key], batch[target_key]], dim=1)
    return cloud.to(device=device, dtype=torch.float32).transpose(1, 2).contiguous()


class DiffusionTrainStep:
    """``iteration_update`` of the diffusion trainer: one optimiser step on the denoising loss.

    The batch holds "condition" (B, Nc, 3) and "target" (B, Nt, 3) normalised points.
    """

    def __init__(self, diffusion, condition_key: str = "condition", target_key: str = "target") -> None:
        self.diffusion = diffusion
        self.condition_key = condition_key
        self.target_key = target_key

    def __call__(self, engine, batch: dict) -> dict:
        x0 = points_batch(batch, engine.state.device, self.condition_key, self.target_key)
        num_condition = batch[self.condition_key].shape[1]
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        loss = self.diffusion.training_loss(engine.network, x0, num_condition)
        loss.backward()
        engine.optimizer.step()
        return {CommonKeys.LOSS: loss.detach()}


class DiffusionValStep:
    """``iteration_update`` of the diffusion evaluator: sample the target points, score them.

    Returns {"chamfer": (B,)} the symmetric (non-squared) Chamfer distance between generated and
    true target points in the points' original units (voxels or mm: normalised distance x scale).
    """

    def __init__(
        self,
        diffusion,
        sampler: str = "ddim",
        steps: int = 20,
        seed: int = 0,
        condition_key: str = "condition",
        target_key: str = "target",
    ) -> None:
        self.diffusion = diffusion
        self.sampler = sampler
        self.steps = steps
        self.seed = seed
        self.condition_key = condition_key
        self.target_key = target_key

    @torch.no_grad()
    def __call__(self, engine, batch: dict) -> dict:
        device = engine.state.device
        condition = batch[self.condition_key].to(device=device, dtype=torch.float32).transpose(1, 2)
        target = batch[self.target_key].to(device=device, dtype=torch.float32)
        generator = torch.Generator(device=device).manual_seed(self.seed)
        network = unwrap(engine.network)  # no DDP collectives: validation may run on rank 0 only
        network.eval()
        steps = None if self.sampler == "ddpm" else self.steps
        cloud = self.diffusion.sample(
            network, condition, target.shape[1], sampler=self.sampler, steps=steps, generator=generator
        )
        generated = cloud[:, :, condition.shape[2] :].transpose(1, 2)
        scale = batch["norm_scale"].to(device=device, dtype=torch.float32).reshape(-1)
        chamfer = chamfer_distance(generated, target, squared=False) * scale
        return {"chamfer": chamfer}


# ----------------------------------------------------------------------------- voxelizer steps
class VoxelizerTrainStep:
    """``iteration_update`` of the voxelizer trainer: SAP forward on "points" (B, N, 3) in the unit
    cube, loss against "indicator" (B, r, r, r), one optimiser step."""

    def __init__(self, loss_function, points_key: str = "points", target_key: str = "indicator") -> None:
        self.loss_function = loss_function
        self.points_key, self.target_key = points_key, target_key

    def __call__(self, engine, batch: dict) -> dict:
        points = batch[self.points_key].to(engine.state.device, dtype=torch.float32)
        target = batch[self.target_key].to(engine.state.device, dtype=torch.float32)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_function(engine.network(points)["indicator"], target)
        loss.backward()
        engine.optimizer.step()
        return {CommonKeys.LOSS: loss.detach()}


class VoxelizerValStep:
    """``iteration_update`` of the voxelizer evaluator: predicted mask (indicator <= 0) and true mask
    (target < 0) as (B, 1, r, r, r) under CommonKeys.PRED / LABEL, for MONAI's Dice handler."""

    def __init__(self, points_key: str = "points", target_key: str = "indicator") -> None:
        self.points_key, self.target_key = points_key, target_key

    @torch.no_grad()
    def __call__(self, engine, batch: dict) -> dict:
        network = unwrap(engine.network)
        network.eval()
        points = batch[self.points_key].to(engine.state.device, dtype=torch.float32)
        indicator = network(points)["indicator"]
        target = batch[self.target_key].to(engine.state.device)
        return {CommonKeys.PRED: (indicator <= 0).float()[:, None], CommonKeys.LABEL: (target < 0).float()[:, None]}
