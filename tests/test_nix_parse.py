"""Every .nix file of the repository parses (`nix-instantiate --parse`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

NIX_INSTANTIATE = shutil.which("nix-instantiate")
SKIP_DIRS = {".git", ".venv", "node_modules", "result"}


def nix_files() -> list[Path]:
    """The repository's .nix files, outside VCS, virtualenv and build-result dirs."""
    return sorted(
        p
        for p in REPO.rglob("*.nix")
        if not SKIP_DIRS.intersection(p.relative_to(REPO).parts)
        and not p.relative_to(REPO).parts[0].startswith("result")
    )


def test_there_are_nix_files() -> None:
    names = {p.relative_to(REPO).as_posix() for p in nix_files()}
    assert {"flake.nix", "modules/lib.nix", "modules/builder.nix", "modules/client.nix"} <= names


@pytest.mark.skipif(NIX_INSTANTIATE is None, reason="needs nix-instantiate (tests/run installs nix-bin)")
@pytest.mark.parametrize("path", nix_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_parses(path: Path) -> None:
    assert NIX_INSTANTIATE is not None
    proc = subprocess.run(
        [NIX_INSTANTIATE, "--parse", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
