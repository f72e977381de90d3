"""End-to-end tests of the diffusion trainer (configs/train_base.json + configs/train_diffusion.json): training, EMA,
validation, resume after SIGKILL."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle_training import train_in_process

from scripts.data.synthetic import generate_skullbreak
from scripts.checkpoints import attach_checkpointing, checkpoint_files, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ["configs/train_base.json", "configs/train_diffusion.json"]
TINY = dict(preset="tiny", surface_points=2000, batch_size=2, learning_rate=0.002, log_interval=1)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """Four 40^3 skulls with a bilateral defect: 3 train, 1 test."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_skullbreak(root, num_cases=4, size=40, seed=0, defects="bilateral")
    return root


def train(dataset_dir, output_dir, **override):
    """Run the diffusion bundle in-process (tiny preset); returns (workflow, per-iteration training losses)."""
    return train_in_process(CONFIG, dataset_dir, output_dir, **{**TINY, **override})


@pytest.mark.slow
def test_training_lowers_the_loss_and_is_reproducible(dataset_dir, tmp_path):
    _, losses = train(dataset_dir, tmp_path / "a", max_epochs=1, epoch_length=80, val_interval=100)
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    print(f"diffusion loss: first 20 iterations {first:.3f}, last 20 {last:.3f}")
    assert last < 0.8 * first

    # same seed -> same losses; this run also validates, keeps EMA weights and logs to TensorBoard
    workflow, again = train(
        dataset_dir, tmp_path / "b", max_epochs=1, epoch_length=10, val_interval=1, use_ema=True, val_steps=5
    )
    assert again == losses[:10]
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    chamfer = evaluator.state.metrics["val_chamfer"]
    assert np.isfinite(chamfer) and chamfer > 0
    state = torch.load(tmp_path / "b" / "checkpoints" / "final.pt", weights_only=False)
    assert set(state) == {"network", "optimizer", "lr_scheduler", "trainer", "ema_network"}
    assert state["ema_network"].keys() == state["network"].keys()
    assert any(not torch.equal(state["ema_network"][k], state["network"][k]) for k in state["network"])
    assert (tmp_path / "b" / "checkpoints" / "best_network.pt").is_file()
    assert list((tmp_path / "b").glob("events.out.tfevents.*"))


def test_the_recipe_trains_and_validates_through_the_config(dataset_dir, tmp_path):
    """configs/recipes/denoiser_small.json (x0 prediction, OT pairing, EMA) at the tiny preset: a short run
    through the config trains (the loss falls), validates its EMA weights (a Chamfer distance in voxels) and
    writes them. That the mechanics learn a shape is tests/test_memorisation.py's job."""
    workflow, losses = train_in_process(
        [*CONFIG, "configs/recipes/denoiser_small.json"], dataset_dir, tmp_path,
        **{**TINY, "split_file": None, "surface_transforms#3#num_points": 2000}, max_epochs=1, epoch_length=40,
        val_interval=1, val_steps=5, num_val_cases=1)
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])
    diffusion = workflow.parser.get_parsed_content("train#iteration").diffusion
    assert (diffusion.prediction_type, diffusion.pairing) == ("sample", "ot")
    chamfer = workflow.parser.get_parsed_content("validate#evaluator").state.metrics["val_chamfer"]
    assert np.isfinite(chamfer) and chamfer > 0
    assert "ema_network" in torch.load(tmp_path / "checkpoints" / "final.pt", weights_only=False)


def test_latest_checkpoint_is_the_highest_loadable_iteration(tmp_path):
    for name, iteration in (("final.pt", 100), ("checkpoint_iteration=110.pt", 110), ("checkpoint_iteration=120.pt", 120)):
        torch.save({"trainer": {"iteration": iteration}, "network": {"w": torch.ones(3)}}, tmp_path / name)
    assert [p.name for p in checkpoint_files(tmp_path)] == [
        "checkpoint_iteration=110.pt", "checkpoint_iteration=120.pt", "final.pt"
    ]
    # final.pt of an earlier, shorter run does not shadow the checkpoints of the longer run after it
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_iteration=120.pt")
    newest = tmp_path / "checkpoint_iteration=120.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_iteration=110.pt")
    assert latest_checkpoint(tmp_path / "missing") is None


def test_resume_from_a_checkpoint_without_lr_scheduler(tmp_path, caplog):
    """A checkpoint without the lr_scheduler: training resumes with a warning;
    a checkpoint lacking the network is refused with a message naming the file."""
    from ignite.engine import Engine, Events

    def objects():
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 1)
        opt = torch.optim.Adam(net.parameters(), 1e-2)
        return net, opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)

    def step(net, opt):
        def update(engine, batch):
            opt.zero_grad()
            loss = (net(batch) ** 2).mean()
            loss.backward()
            opt.step()
        return update

    data = [torch.ones(2, 3)] * 4
    net, opt, _ = objects()
    first = Engine(step(net, opt))
    attach_checkpointing(first, tmp_path, {"network": net, "optimizer": opt}, interval=4)  # older config
    first.run(data, max_epochs=1)
    trained = {k: v.clone() for k, v in net.state_dict().items()}

    net, opt, scheduler = objects()
    second = Engine(step(net, opt))
    attach_checkpointing(second, tmp_path, {"network": net, "optimizer": opt, "lr_scheduler": scheduler}, interval=4)
    seen = []
    second.add_event_handler(Events.STARTED, lambda e: seen.append({k: v.clone() for k, v in net.state_dict().items()}))
    with caplog.at_level("WARNING"):
        second.run(data, max_epochs=2)
    assert "lacks ['lr_scheduler']" in caplog.text
    assert all(torch.equal(seen[0][k], trained[k]) for k in trained)  # the stored weights were loaded
    assert second.state.iteration == 8  # and the counters: one more epoch

    torch.save({"trainer": {"iteration": 9, "epoch_length": 4, "max_epochs": 3}}, tmp_path / "checkpoint_iteration=9.pt")
    net, opt, _ = objects()
    with pytest.raises(ValueError, match=r"checkpoint_iteration=9.pt lacks \['network', 'optimizer'\]"):
        attach_checkpointing(Engine(step(net, opt)), tmp_path, {"network": net, "optimizer": opt}, interval=4)


def _checkpointed_linear_engine(ckpt_dir, keep_interval: int | None = None, make_scheduler=None):
    """An ignite Engine fitting a Linear(3, 1) by SGD, checkpointed every 2 iterations into ckpt_dir; with
    ``make_scheduler(optimizer)``, a learning-rate schedule stepped every epoch and checkpointed too."""
    from ignite.engine import Engine, Events

    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), 1e-2)

    def update(engine, batch):
        opt.zero_grad()
        (net(batch) ** 2).mean().backward()
        opt.step()

    engine = Engine(update)
    objects = {"network": net, "optimizer": opt}
    if make_scheduler is not None:
        objects["lr_scheduler"] = scheduler = make_scheduler(opt)
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda _: scheduler.step())
    attach_checkpointing(engine, ckpt_dir, objects, interval=2, keep_interval=keep_interval)
    return engine


def test_resume_under_a_schedule_of_another_kind_keeps_the_configs_schedule(tmp_path, caplog):
    """A constant-rate run (ExponentialLR, gamma 1) resumed under a step schedule: the stored gamma must
    not overwrite the new schedule's; its epoch counter carries on, so the step lands at its epoch."""
    data = [torch.ones(2, 3)] * 2
    constant_rate = _checkpointed_linear_engine(
        tmp_path, make_scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=1.0))
    constant_rate.run(data, max_epochs=2)
    made = []

    def step_schedule(opt):
        made.append(torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3], gamma=0.5))
        return made[-1]

    with caplog.at_level("WARNING"):
        _checkpointed_linear_engine(tmp_path, make_scheduler=step_schedule).run(data, max_epochs=4)
    scheduler = made[0]
    assert "schedule of another kind" in caplog.text
    assert scheduler.gamma == 0.5 and scheduler.last_epoch == 4
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)  # one step, at epoch 3


def test_kept_checkpoints_stay_and_are_never_resumed_from(tmp_path):
    """keep_interval: every n iterations a checkpoint also goes to <ckpt_dir>/kept/ for good, while
    the rolling checkpoints keep only the newest two; resuming reads ckpt_dir itself."""
    _checkpointed_linear_engine(tmp_path, keep_interval=3).run([torch.ones(2, 3)] * 9, max_epochs=1)
    assert [p.name for p in checkpoint_files(tmp_path)] == [
        "checkpoint_iteration=6.pt", "checkpoint_iteration=8.pt", "final.pt"]
    kept = checkpoint_files(tmp_path / "kept")
    assert [p.name for p in kept] == [f"checkpoint_iteration={i}.pt" for i in (3, 6, 9)]
    assert [torch.load(p, weights_only=False)["trainer"]["iteration"] for p in kept] == [3, 6, 9]
    assert latest_checkpoint(tmp_path) == str(tmp_path / "final.pt")


def test_a_resumed_run_prunes_the_rolling_checkpoints_of_earlier_sittings(tmp_path):
    """MONAI's CheckpointSaver only prunes what it wrote itself; after a resume the newest n_saved
    numbered checkpoints are still all that stays, and the kept ones are never touched."""
    data = [torch.ones(2, 3)] * 4
    _checkpointed_linear_engine(tmp_path, keep_interval=4).run(data, max_epochs=2)
    assert [p.name for p in checkpoint_files(tmp_path)] == [
        "checkpoint_iteration=6.pt", "checkpoint_iteration=8.pt", "final.pt"]
    assert _checkpointed_linear_engine(tmp_path, keep_interval=4).run(data, max_epochs=4).iteration == 16
    assert [p.name for p in checkpoint_files(tmp_path)] == [
        "checkpoint_iteration=14.pt", "checkpoint_iteration=16.pt", "final.pt"]
    assert [p.name for p in checkpoint_files(tmp_path / "kept")] == [
        f"checkpoint_iteration={i}.pt" for i in (4, 8, 12, 16)]


def _iterations_logged(log: str) -> int:
    return len(re.findall(r"Epoch: \d+/\d+, Iter: \d+/\d+ -- train_loss", log))


@pytest.mark.slow
def test_resume_after_sigkill_skips_truncated_checkpoint(dataset_dir, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIG), "--dataset_dir", str(dataset_dir),
        "--output_dir", str(out), "--max_epochs", "6", "--epoch_length", "4", "--ckpt_interval", "2", "--val_interval", "100",
        *[f"--{k}={v}" for k, v in TINY.items()],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while len(checkpoint_files(out / "checkpoints")) < 2:
                assert proc.poll() is None, "training ended before it could be killed"
                assert time.monotonic() < deadline, "no checkpoints within 300 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
    *_, previous, newest = checkpoint_files(out / "checkpoints")
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a write cut short by the kill
    assert latest_checkpoint(out / "checkpoints") == str(previous)
    resumed_from = int(re.search(r"iteration=(\d+)", previous.name).group(1))

    second = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert second.returncode == 0, second.stdout[-3000:]
    assert f"skipping unreadable checkpoint {newest}" in second.stdout
    assert f"resuming from {previous}" in second.stdout
    assert f"Restored all variables from {previous}" in second.stdout
    final = torch.load(out / "checkpoints" / "final.pt", weights_only=False)
    assert final["trainer"]["iteration"] == 24
    assert _iterations_logged(second.stdout) == 24 - resumed_from


def test_recipe_overlay_builds_the_shipped_recipe_and_warm_starts_from_init_weights(dataset_dir, tmp_path):
    """configs/recipes/denoiser_small.json on top of the train config: x0 prediction, OT pairing,
    Adam (0.9, 0.999), no dropout, EMA; ``init_weights`` loads into the network and its EMA copy."""
    from monai.bundle import ConfigWorkflow

    from scripts.networks.pvcnn2 import PVCNN2Denoiser

    start = PVCNN2Denoiser("small")
    torch.nn.init.constant_(start.head[-1].bias, 0.25)
    torch.save(start.state_dict(), tmp_path / "start.pt")
    workflow = ConfigWorkflow(
        config_file=[*(str(ROOT / c) for c in CONFIG), str(ROOT / "configs" / "recipes" / "denoiser_small.json")],
        workflow_type="train", dataset_dir=str(dataset_dir), output_dir=str(tmp_path / "run"),
        init_weights=str(tmp_path / "start.pt"), device="cpu",
    )
    parser = workflow.parser
    diffusion, optimizer = parser.get_parsed_content("diffusion"), parser.get_parsed_content("optimizer")
    assert (diffusion.prediction_type, diffusion.pairing, diffusion.clip_x0) == ("sample", "ot", 4.0)
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["lr"] == 1e-3
    network = parser.get_parsed_content("network")
    assert all(m.p == 0.0 for m in network.modules() if isinstance(m, torch.nn.Dropout))
    ema = parser.get_parsed_content("train#ema").ema_model
    for state in (network.state_dict(), ema.state_dict()):
        assert all(torch.equal(state[k], v) for k, v in start.state_dict().items())


def test_training_sees_every_volume_in_ras_order(tmp_path):
    """The surface transforms orient each mask to RAS before sampling points, as inference does: a pair stored
    with permuted axes gives the training points of the pair as it was."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from scripts.data.synthetic import skullbreak_case
    from scripts.io import save_mask

    parser = ConfigParser()
    parser.read_config([str(Path(__file__).resolve().parents[1] / f) for f in CONFIG])
    parser["surface_points"] = 200
    transform = Compose(parser.get_parsed_content("surface_transforms"))
    case = skullbreak_case(0, size=40)
    defective, implant = case.defect("parietotemporal")
    perm = (1, 2, 0)
    moved_affine = case.affine.copy()
    moved_affine[:3, :3] = moved_affine[:3, :3][:, list(perm)]
    files = {}
    for name, affine, order in (("ras", case.affine, (0, 1, 2)), ("moved", moved_affine, perm)):
        files[name] = {key: str(save_mask(tmp_path / f"{name}_{key}.nrrd", np.ascontiguousarray(np.transpose(mask, order)),
                                          affine)) for key, mask in (("defective", defective), ("implant", implant))}
    ras, moved = transform(files["ras"]), transform(files["moved"])
    for key in ("defective_points", "implant_points"):
        assert torch.equal(ras[key], moved[key])
