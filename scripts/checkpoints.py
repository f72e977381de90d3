"""Training checkpoints: resume from the newest loadable one, save every few iterations (MONAI handlers)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from ignite.engine import Events
from monai.handlers import CheckpointLoader, CheckpointSaver

from scripts.distributed import is_main_process, unwrap
from scripts.weights import UnsafeFileError, read_weights_file

logger = logging.getLogger(__name__)

_CKPT_ITERATION = re.compile(r"iteration=(\d+)\.pt$")
FINAL_CHECKPOINT = "final.pt"
KEPT_FOLDER = "kept"  # <ckpt_dir>/kept/: checkpoints kept for good (learning curves); never resumed from
OPTIONAL_CHECKPOINT_OBJECTS = {"lr_scheduler"}  # may be missing from checkpoints of older bundle versions


def checkpoint_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Training checkpoints in ckpt_dir: MONAI's ``*iteration=<n>.pt`` in the order of n, then ``final.pt``."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    numbered = [(int(m.group(1)), p) for p in folder.glob("*.pt") if (m := _CKPT_ITERATION.search(p.name))]
    final = folder / FINAL_CHECKPOINT
    return [p for _, p in sorted(numbered, key=lambda item: item[0])] + ([final] if final.is_file() else [])


def prune_rolling_checkpoints(ckpt_dir: str | os.PathLike, n_saved: int) -> None:
    """Delete the numbered checkpoints in ckpt_dir beyond the newest n_saved (``final.pt`` and ``kept/`` stay).

    MONAI's CheckpointSaver prunes only the files it wrote itself, so without this a resumed run
    leaves the numbered checkpoints of every earlier sitting behind.
    """
    numbered = [p for p in checkpoint_files(ckpt_dir) if p.name != FINAL_CHECKPOINT]
    for path in numbered[:-n_saved]:
        path.unlink(missing_ok=True)


def _newest_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[str, dict] | None:
    """(path, stored objects, tensors memory-mapped) of the newest loadable checkpoint in ckpt_dir, or None;
    see :func:`latest_checkpoint`. A checkpoint that could run code when loaded raises UnsafeFileError."""
    latest, latest_iteration = None, -1
    for path in checkpoint_files(ckpt_dir):
        try:  # mmap: the zip directory is checked and the trainer state read without loading tensors
            stored = read_weights_file(path, mmap=True)
            iteration = int(stored["trainer"]["iteration"])
        except UnsafeFileError:  # tampered with, not cut short: stop rather than resume from an older one
            raise
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped, not fatal
            logger.warning("skipping unreadable checkpoint %s: %s", path, err)
            continue
        if iteration >= latest_iteration:
            latest, latest_iteration = (str(path), stored), iteration
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
    restarts, with a warning); any other missing object raises ValueError naming the file. A stored
    schedule of another kind (e.g. a run of a constant-rate recipe resumed under a step schedule)
    passes on only its step counters, with a warning: loading it whole would overwrite the config's
    schedule (a stored ``gamma`` of 1.0 would silently cancel every later decay).
    """
    newest = _newest_checkpoint(ckpt_dir)
    if newest is None:
        return []
    path, stored = newest
    load_dict = dict(load_dict)
    scheduler = load_dict.get("lr_scheduler")
    if scheduler is not None and "lr_scheduler" in stored and set(stored["lr_scheduler"]) != set(scheduler.state_dict()):
        logger.warning("checkpoint %s holds a learning-rate schedule of another kind: resuming its step counter "
                       "under this config's %s", path, type(scheduler).__name__)
        load_dict["lr_scheduler"] = _ScheduleCounters(scheduler)
    missing = sorted(set(load_dict) - set(stored))
    if set(missing) - OPTIONAL_CHECKPOINT_OBJECTS:
        raise ValueError(f"checkpoint {path} lacks {missing} (stored: {sorted(stored)}); it does not belong to "
                         "this training config: move it out of the checkpoint folder to start afresh")
    if missing:
        logger.warning("checkpoint %s lacks %s: resuming without it (its state starts afresh)", path, missing)
    logger.info("resuming from %s", path)
    load = {k: v for k, v in load_dict.items() if k not in missing}
    return [CheckpointLoader(load_path=path, load_dict=load, map_location=map_location)]


class _ScheduleCounters:
    """Loads only the step counters of a stored scheduler state into ``scheduler`` (see :func:`resume_handlers`)."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.last_epoch, self.scheduler._step_count = state["last_epoch"], state["_step_count"]


def attach_checkpointing(
    trainer,
    ckpt_dir: str | os.PathLike,
    objects: dict,
    interval: int,
    ema=None,
    n_saved: int = 2,
    keep_interval: int | None = None,
) -> dict:
    """Resume ``trainer`` from the newest loadable checkpoint in ckpt_dir and save every ``interval``
    iterations (plus ``final.pt``); returns the checkpointed objects. Only the newest ``n_saved``
    numbered checkpoints stay, also across resumed sittings; with ``keep_interval``, every
    ``keep_interval`` iterations a copy also goes to ``<ckpt_dir>/kept/`` and is never deleted
    (``tools.learning_curve`` scores those).

    objects: e.g. {"network": ..., "optimizer": ...}; the trainer (iteration/epoch counters) and,
    with an ignite ``EMAHandler``, its EMA weights are added here: a config cannot reference the
    trainer from inside the trainer's own handler list. ``ema`` is attached to the trainer here,
    before the savers, so that every checkpoint holds the EMA weights of its own iteration.
    Networks are saved DDP-unwrapped; only the main process writes.
    """
    objects = {k: unwrap(v) if isinstance(v, torch.nn.Module) else v for k, v in objects.items()}
    objects["trainer"] = trainer
    if ema is not None:
        ema.attach(trainer)
        objects["ema_network"] = ema.ema_model
    for handler in resume_handlers(ckpt_dir, objects):
        handler.attach(trainer)
    if is_main_process():
        os.makedirs(ckpt_dir, exist_ok=True)
        CheckpointSaver(
            save_dir=str(ckpt_dir), save_dict=objects, epoch_level=False, save_interval=interval,
            n_saved=n_saved, save_final=True, final_filename=FINAL_CHECKPOINT,
        ).attach(trainer)
        if n_saved:  # after the saver's own pruning: also those of earlier sittings
            trainer.add_event_handler(
                Events.ITERATION_COMPLETED(every=interval), lambda _: prune_rolling_checkpoints(ckpt_dir, n_saved))
        if keep_interval:
            CheckpointSaver(
                save_dir=str(Path(ckpt_dir) / KEPT_FOLDER), save_dict=objects, epoch_level=False,
                save_interval=keep_interval, n_saved=None,
            ).attach(trainer)
    return objects
