"""Where the agent finds a systemd unit's memory files, on each cgroup layout.

systemd reports a unit's cgroup as one path (ControlGroup), the same in every
hierarchy; which mount holds the memory files depends on the layout. Before
this was checked, the agent looked only at /sys/fs/cgroup/<ControlGroup>,
right on pure cgroup v2 but a directory that does not exist on v1 and hybrid
systems (this machine), so `oom_kills` was always null there. Fake trees under
tmp_path stand in for /sys/fs/cgroup; tests/test_systemd_host.py checks the
same against a real systemd and a real OOM kill.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nixfarm.builder import cgroups

UNIT_CGROUP = "/system.slice/nix-daemon.service"


def make_files(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def v1_tree(root: Path, oom_kills: int) -> None:
    """Legacy/hybrid: a tmpfs with one directory per hierarchy, memory on v1."""
    make_files(
        root / "memory" / UNIT_CGROUP.lstrip("/"),
        {"memory.oom_control": f"oom_kill_disable 0\nunder_oom 0\noom_kill {oom_kills}\n"},
    )
    (root / "systemd" / UNIT_CGROUP.lstrip("/")).mkdir(parents=True)
    (root / "unified" / UNIT_CGROUP.lstrip("/")).mkdir(parents=True)  # hybrid: no memory here


def v2_tree(root: Path, oom_kills: int) -> None:
    """Pure cgroup v2 (NixOS): one hierarchy mounted at the root."""
    make_files(root, {"cgroup.controllers": "cpu io memory pids\n"})
    make_files(
        root / UNIT_CGROUP.lstrip("/"),
        {"memory.events": f"low 0\nhigh 0\nmax 3\noom {oom_kills}\noom_kill {oom_kills}\n"},
    )


def test_v1_memory_files_are_under_the_memory_hierarchy(tmp_path: Path) -> None:
    v1_tree(tmp_path, 2)
    found = cgroups.systemd_memory_dir(UNIT_CGROUP, str(tmp_path))
    assert found == str(tmp_path / "memory" / "system.slice" / "nix-daemon.service")


def test_v2_memory_files_are_under_the_root(tmp_path: Path) -> None:
    v2_tree(tmp_path, 1)
    found = cgroups.systemd_memory_dir(UNIT_CGROUP, str(tmp_path))
    assert found == str(tmp_path / "system.slice" / "nix-daemon.service")


def test_hybrid_without_v1_memory_uses_the_unified_mount(tmp_path: Path) -> None:
    (tmp_path / "systemd").mkdir()
    (tmp_path / "unified").mkdir()
    found = cgroups.systemd_memory_dir(UNIT_CGROUP, str(tmp_path))
    assert found == str(tmp_path / "unified" / "system.slice" / "nix-daemon.service")


class FakeUnit:
    """The three properties the reader takes from pydbus's unit proxy."""

    MemoryCurrent = 3 << 20
    MemoryMax = 64 << 20
    ControlGroup = UNIT_CGROUP


@pytest.mark.parametrize(("make_tree", "kills"), [(v1_tree, 2), (v2_tree, 1)])
def test_reader_reports_oom_kills_from_systemd_on_both_layouts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_tree: Any, kills: int
) -> None:
    make_tree(tmp_path, kills)
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", str(tmp_path))
    reader = cgroups.DaemonMemoryReader("nix-daemon.service")
    # No systemd on this machine: hand the reader the proxy it would have got.
    reader._systemd = FakeUnit()
    assert reader.read() == {
        "source": "systemd",
        "cgroup": UNIT_CGROUP,
        "current_bytes": 3 << 20,
        "max_bytes": 64 << 20,
        "oom_kills": kills,
        "error": None,
    }
