"""The `small` and `7b-wide` presets built once for the GPU checks (the shared fixtures build only the
tiny ones)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.engine.models.builder import build_model


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("models") / "epd-small", "small")


@pytest.fixture(scope="session")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("models") / "epd-7b-wide", "7b-wide")
