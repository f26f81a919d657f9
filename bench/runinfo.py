"""What every benchmark records about its run: the machine, the farms beside it, a clean end."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import farm  # tests/farm.py: the scripts put tests/ on sys.path first

REPO = Path(__file__).resolve().parent.parent


def version_of(argv: list[str]) -> str:
    """First line a program prints for its version (ssh prints on stderr)."""
    out = subprocess.run(argv, check=False, capture_output=True, text=True)
    return ((out.stdout or out.stderr).strip().splitlines() or [""])[0]


def machine_info() -> dict[str, Any]:
    """Where and when the numbers were taken, and from which checkout."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nix": version_of(["nix", "--version"]),
        "ssh": version_of(["ssh", "-V"]),
        # The agent runs from this checkout: which commit, and whether its code was edited.
        "commit": version_of(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "agent_modified": bool(
            version_of(["git", "-C", str(REPO), "status", "--porcelain", "agent/nixfarm"])
        ),
    }


def other_farms(own_id: str) -> set[str]:
    """Network namespaces of other harness farms alive now (tests running alongside)."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {
        line.split()[0]
        for line in names.stdout.splitlines()
        if line.startswith(farm.PREFIX) and not line.startswith(f"{farm.PREFIX}{own_id}-")
    }


def check_clean(farm_id: str, timeout: float = 5) -> None:
    """Raise unless the closed farm left nothing behind (the kernel may take a moment)."""
    deadline = time.monotonic() + timeout
    while left := farm.leftovers(farm_id):
        if time.monotonic() > deadline:
            raise farm.FarmError(f"farm {farm_id} left things behind: {', '.join(left)}")
        time.sleep(0.1)
