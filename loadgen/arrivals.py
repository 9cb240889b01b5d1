"""Open-loop arrival times: Poisson, gamma (burstiness), or constant spacing, from a seed."""

from __future__ import annotations

import numpy as np


def arrival_offsets(
    n: int, rate: float, kind: str = "poisson", burstiness: float = 1.0, seed: int = 0
) -> list[float]:
    """Send times (seconds from the start) of n requests at `rate` requests/s on average.

    gamma with shape = burstiness keeps the mean gap 1/rate; burstiness < 1 is burstier than Poisson,
    > 1 smoother, and 1 is Poisson (vllm bench serve's convention)."""
    if rate <= 0 or n <= 0:
        raise ValueError("rate and n must be positive")
    rng = np.random.default_rng(seed)
    if kind == "constant":
        gaps = np.full(n, 1.0 / rate)
    elif kind == "poisson":
        gaps = rng.exponential(1.0 / rate, n)
    elif kind == "gamma":
        if burstiness <= 0:
            raise ValueError("burstiness must be positive")
        gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), n)
    else:
        raise ValueError(f"unknown arrival process {kind!r}")
    gaps[0] = 0.0  # the first request goes at once
    return np.cumsum(gaps).tolist()
