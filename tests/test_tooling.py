"""The project's own tooling is part of the suite: ruff and mypy --strict stay clean."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _tool(name: str) -> list[str]:
    found = shutil.which(name, path=str(REPO / ".venv" / "bin")) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return [found]


CODE = [p for p in ("sfwatch", "tests", "bench") if (REPO / p).is_dir()]


@pytest.mark.parametrize(
    "args", [["check", *CODE], ["format", "--check", *CODE]], ids=["lint", "format"]
)
def test_ruff(args: list[str]) -> None:
    """ruff finds nothing to complain about."""
    result = subprocess.run(
        [*_tool("ruff"), *args], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    """mypy --strict (configured in pyproject.toml) passes on code, tests and benchmarks."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True, check=False
    )
    if "No module named mypy" in result.stderr:
        pytest.skip("mypy is not installed")
    assert result.returncode == 0, result.stdout + result.stderr
