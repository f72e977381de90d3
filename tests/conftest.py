"""Suite-wide settings: one intra-op thread.

The suite's networks are tiny; extra OpenMP threads only add barrier waits (up to 20x slower on a
shared 2-core machine). OMP_NUM_THREADS also reaches the bundle runs that tests start as subprocesses.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the environment variable, which torch reads at import)

torch.set_num_threads(1)
