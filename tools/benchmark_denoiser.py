"""Benchmark the PVCNN2 denoiser forward pass (eval mode, no grad) on CPU.

Each batch size runs in a fresh subprocess so that its peak resident set size (max RSS) is its
own. The input mimics a normalised skull: condition points on two concentric shells (outer and
inner table, radius 3.0 / 2.8) with a missing cap (the defect), generated points as pure noise
(the first sampler step, t = T - 1).

    python -m tools.benchmark_denoiser main --batches=1,5 --threads=1,2 --preset=paper --repeats=3
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from scripts.networks.pvcnn2 import PVCNN2Denoiser


def synthetic_input(batch: int, num_points: int, num_condition: int, seed: int = 0) -> torch.Tensor:
    """``(B, 3, N)``: condition points on a double shell without a cap, then Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, 4 * num_condition, 3, generator=g)
    cond = cond / cond.norm(dim=2, keepdim=True)
    cond = torch.stack([c[c[:, 2] < 0.8][:num_condition] for c in cond])  # remove the cap z > 0.8
    radius = torch.where(torch.rand(batch, num_condition, 1, generator=g) < 0.5, 3.0, 2.8)
    noise = torch.randn(batch, num_points - num_condition, 3, generator=g)
    return torch.cat([cond * radius, noise], dim=1).transpose(1, 2).contiguous()


def measure(batch: int = 1, preset: str = "paper", repeats: int = 3, seed: int = 0, threads: int = 0) -> None:
    """Time ``repeats`` forward passes after one warm-up in this process; print a JSON line.
    ``threads`` > 0 sets torch's intra-op threads (0: torch default)."""
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = PVCNN2Denoiser(preset).eval()
    cfg = model.config
    x = synthetic_input(batch, cfg["num_points"], cfg["num_condition"], seed)
    t = torch.full((batch,), 999, dtype=torch.long)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(x, t)
            times.append(time.perf_counter() - start)
    print(json.dumps({
        "preset": preset, "batch": batch, "num_points": cfg["num_points"], "threads": torch.get_num_threads(),
        "warmup_s": times[0], "median_s": statistics.median(times[1:]), "min_s": min(times[1:]),
        "rss_model_gib": rss_model, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }))


def _ints(v: str | int | tuple) -> list[int]:
    """Fire passes "1,5" as a tuple and "1" as an int; accept all forms."""
    return [int(x) for x in (v.split(",") if isinstance(v, str) else v if isinstance(v, (tuple, list)) else [v])]


def main(batches: str | int | tuple = "1,5", preset: str = "paper", repeats: int = 3, seed: int = 0,
         threads: str | int | tuple = 0) -> None:
    """Run ``measure`` per (threads, batch size) in a fresh subprocess and print a markdown table."""
    load = os.getloadavg()[0]
    rows = []
    for n in _ints(threads):
        for b in _ints(batches):
            cmd = [sys.executable, "-m", "tools.benchmark_denoiser", "measure", f"--batch={b}", f"--preset={preset}",
                   f"--repeats={repeats}", f"--seed={seed}", f"--threads={n}"]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s) ({platform.processor() or platform.machine()}), "
          f"load average at start {load:.1f}")
    print("| preset | points | batch | threads | forward median (s) | min (s) | warm-up (s) "
          "| RSS after build (GiB) | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['num_points']} | {r['batch']} | {r['threads']} | {r['median_s']:.2f} | "
              f"{r['min_s']:.2f} | {r['warmup_s']:.2f} | {r['rss_model_gib']:.2f} | {r['peak_rss_gib']:.2f} |")
    first = {}
    for r in rows:  # forward time relative to the first batch size with the same thread count
        base = first.setdefault(r["threads"], r)
        if r is not base:
            print(f"\nthreads {r['threads']}: batch {r['batch']} / batch {base['batch']} forward time "
                  f"{r['median_s'] / base['median_s']:.2f}x")


if __name__ == "__main__":
    import fire  # the CLI only: synthetic_input is imported where fire is not installed (tools/device_check.py)

    fire.Fire({"main": main, "measure": measure})
