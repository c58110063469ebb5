"""Shared pytest fixtures. Other test modules may append fixtures below."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parent.parent


# The offline benchmark copies live outside the repo (they are not ours to commit);
# MLESS_DATA_DIR points elsewhere when the checkout is not next to them.
@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("MLESS_DATA_DIR", _REPO.parent / "shared" / "data"))
    if not (path / "eval" / "math500.jsonl").is_file():
        msg = f"benchmark data not found under {path}; set MLESS_DATA_DIR"
        if os.environ.get("MLESS_REQUIRE_DATA") == "1":  # CI: these tests must run, not skip
            pytest.fail(f"MLESS_REQUIRE_DATA=1 but {msg}")
        pytest.skip(msg)
    return path
