"""Benchmark DPSR wall time and peak memory (max RSS) on CPU.

Every (resolution, mode) setting runs in a fresh subprocess so that max RSS is that setting's peak.
Modes: ``forward`` (inference, ``torch.no_grad``) and ``backward`` (forward + backward of the mean of
the output w.r.t. points and normals). Points: a deterministic Fibonacci sphere with outward normals.

    python -m tools.benchmark_dpsr --res 128 256 512 --points 215040
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch


def sphere_cloud(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n Fibonacci-sphere points (1, n, 3) of radius 0.35 around 0.5 and their outward normals."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    polar, azimuth = torch.acos(1 - 2 * i / n), math.pi * (1 + 5**0.5) * i
    normals = torch.stack((torch.cos(azimuth) * torch.sin(polar), torch.sin(azimuth) * torch.sin(polar),
                           torch.cos(polar)), dim=-1)
    return (0.5 + 0.35 * normals).float()[None], normals.float()[None]


def run_single(res: int, n_points: int, mode: str) -> dict:
    """Time one DPSR call in this process: wall and CPU (user + sys, all threads) seconds, max RSS (GB)
    before and after the call."""
    from scripts.networks.dpsr import DPSR

    points, normals = sphere_cloud(n_points)
    dpsr = DPSR(res)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if mode == "forward":
        with torch.no_grad():
            out = dpsr(points, normals)
    else:
        points.requires_grad_()
        normals.requires_grad_()
        out = dpsr(points, normals)
        out.mean().backward()
        if not (torch.isfinite(points.grad).all() and torch.isfinite(normals.grad).all()):
            raise RuntimeError("non-finite gradients")
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return dict(res=res, points=n_points, mode=mode, seconds=round(seconds, 2), cpu_seconds=round(cpu, 2),
                peak_rss_gb=round(after.ru_maxrss / 2**20, 2), baseline_rss_gb=round(before.ru_maxrss / 2**20, 2),
                threads=torch.get_num_threads())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--res", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--points", type=int, default=215_040, help="30,720 x 7 SAP offsets by default")
    parser.add_argument("--modes", nargs="+", default=["forward", "backward"], choices=["forward", "backward"])
    parser.add_argument("--single", action="store_true", help="internal: run one setting, print JSON")
    args = parser.parse_args()
    if args.single:
        print(json.dumps(run_single(args.res[0], args.points, args.modes[0])))
        return
    print("| r | points | mode | wall time (s) | CPU time (s) | peak RSS (GB) | RSS before call (GB) | threads |")
    print("|---|---|---|---|---|---|---|---|")
    for res in args.res:
        for mode in args.modes:
            cmd = [sys.executable, "-m", "tools.benchmark_dpsr", "--single", "--res", str(res),
                   "--points", str(args.points), "--modes", mode]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            print(f"| {res} | {r['points']:,} | {mode} | {r['seconds']} | {r['cpu_seconds']} | {r['peak_rss_gb']} | "
                  f"{r['baseline_rss_gb']} | {r['threads']} |", flush=True)


if __name__ == "__main__":
    main()
