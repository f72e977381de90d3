"""Multi-GPU training with torchrun + DistributedDataParallel (NCCL on GPUs, gloo on CPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


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


def process_seed(seed: int) -> int:
    """Join the process group (:func:`init_distributed`) and return ``seed`` + this process's rank, so
    that the ranks draw different random numbers."""
    init_distributed()
    return seed + dist.get_rank()
