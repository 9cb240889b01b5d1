"""Write deploy/requirements.lock: epd-serve's runtime dependencies (no test extras), pinned to the
versions installed in this environment (`make lock` after changing pyproject's dependencies)."""

from __future__ import annotations

import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement

SKIP = {"epd-serve", "torch", "setuptools"}  # torch: the Dockerfile installs its CPU or CUDA build first


def closure(
    name: str, extras: tuple[str, ...] = (), seen: dict[str, set[str]] | None = None
) -> dict[str, set[str]]:
    seen = {} if seen is None else seen
    key = re.sub(r"[-_.]+", "-", name).lower()
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return seen
    if key in seen and set(extras) <= seen[key]:
        return seen
    seen.setdefault(key, set()).update(extras)
    for text in dist.requires or []:
        req = Requirement(text)
        wanted = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras))
        if wanted:
            closure(req.name, tuple(req.extras), seen)
    return seen


def main() -> None:
    lines = [
        "# The runtime dependencies of epd-serve (no test extras), "
        "pinned to the versions the test suite runs.",
        "# torch is installed before these by the Dockerfile (CPU or CUDA build, same version).",
        "# Regenerate: make lock",
    ]
    lines += [f"{k}=={md.version(k)}" for k in sorted(closure("epd-serve")) if k not in SKIP]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
