"""Unit tests of cgroup parsing only: /proc/PID/cgroup text and fake cgroup trees.

`parse_proc_cgroup` gets sample texts as the kernel writes them for cgroup v1,
v2 and hybrid hierarchies; `read_cgroup_files` reads small fake trees built
under tmp_path. Reading the real cgroup of a running nix-daemon is covered by
the harness tests, not here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nixfarm.builder.cgroups import V1_UNLIMITED, parse_proc_cgroup, read_cgroup_files

UNIT = "/system.slice/nix-daemon.service"

V1_TEXT = f"""\
12:pids:{UNIT}
11:cpuset:/
10:blkio:{UNIT}
9:memory:{UNIT}
8:devices:{UNIT}
7:freezer:/
6:net_cls,net_prio:/
5:perf_event:/
4:cpu,cpuacct:{UNIT}
3:hugetlb:/
2:rdma:/
1:name=systemd:{UNIT}
"""
V2_TEXT = f"0::{UNIT}\n"
HYBRID_TEXT = V1_TEXT + f"0::{UNIT}\n"


def make_files(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


# parse_proc_cgroup


def test_v1() -> None:
    assert parse_proc_cgroup(V1_TEXT) == (UNIT, None)


def test_v2() -> None:
    assert parse_proc_cgroup(V2_TEXT) == (None, UNIT)


def test_hybrid() -> None:
    assert parse_proc_cgroup(HYBRID_TEXT) == (UNIT, UNIT)


def test_v1_memory_sharing_a_hierarchy() -> None:
    assert parse_proc_cgroup("5:blkio,memory:/build\n1:name=systemd:/other\n") == ("/build", None)


def test_v1_without_memory_controller() -> None:
    assert parse_proc_cgroup("4:cpu,cpuacct:/a\n1:name=systemd:/b\n") == (None, None)


def test_named_hierarchy_is_not_the_memory_controller() -> None:
    assert parse_proc_cgroup("1:name=memory:/x\n") == (None, None)


def test_v2_root_cgroup() -> None:
    assert parse_proc_cgroup("0::/\n") == (None, "/")


def test_path_containing_colons() -> None:
    text = "0::/machine.slice/a:b:c\n9:memory:/x:y\n"
    assert parse_proc_cgroup(text) == ("/x:y", "/machine.slice/a:b:c")


def test_empty_text() -> None:
    assert parse_proc_cgroup("") == (None, None)


def test_this_process_cgroup_file_parses() -> None:
    with open("/proc/self/cgroup") as f:
        v1, v2 = parse_proc_cgroup(f.read())
    assert v1 is not None or v2 is not None


# read_cgroup_files: cgroup v1


def test_v1_files(tmp_path: Path) -> None:
    make_files(
        tmp_path / "memory" / UNIT.lstrip("/"),
        {
            "memory.limit_in_bytes": "536870912\n",
            "memory.usage_in_bytes": "12345678\n",
            "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        },
    )
    assert read_cgroup_files(UNIT, None, root=str(tmp_path)) == {
        "source": "cgroup1",
        "cgroup": UNIT,
        "current_bytes": 12345678,
        "max_bytes": 536870912,
        "oom_kills": 3,
    }


@pytest.mark.parametrize("limit", ["9223372036854771712", str(V1_UNLIMITED)])
def test_v1_no_limit(tmp_path: Path, limit: str) -> None:
    """v1 writes "no limit" as a huge page-aligned number."""
    make_files(
        tmp_path / "memory" / "build",
        {"memory.limit_in_bytes": f"{limit}\n", "memory.usage_in_bytes": "1\n"},
    )
    assert read_cgroup_files("/build", None, root=str(tmp_path))["max_bytes"] is None


def test_v1_large_real_limit_is_kept(tmp_path: Path) -> None:
    make_files(
        tmp_path / "memory" / "build",
        {"memory.limit_in_bytes": f"{1 << 40}\n", "memory.usage_in_bytes": "1\n"},
    )
    assert read_cgroup_files("/build", None, root=str(tmp_path))["max_bytes"] == 1 << 40


def test_v1_oom_control_without_oom_kill(tmp_path: Path) -> None:
    """Kernels before 4.13 have no oom_kill line: the count is unknown, not zero."""
    make_files(
        tmp_path / "memory" / "build",
        {
            "memory.limit_in_bytes": "1048576\n",
            "memory.usage_in_bytes": "2048\n",
            "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\n",
        },
    )
    assert read_cgroup_files("/build", None, root=str(tmp_path))["oom_kills"] is None


def test_v1_root_cgroup(tmp_path: Path) -> None:
    make_files(
        tmp_path / "memory",
        {"memory.limit_in_bytes": "9223372036854771712\n", "memory.usage_in_bytes": "777\n"},
    )
    result = read_cgroup_files("/", None, root=str(tmp_path))
    assert (result["current_bytes"], result["max_bytes"], result["oom_kills"]) == (777, None, None)


def test_v1_is_preferred_in_a_hybrid_tree(tmp_path: Path) -> None:
    make_files(
        tmp_path / "memory" / "build",
        {"memory.limit_in_bytes": "1048576\n", "memory.usage_in_bytes": "10\n"},
    )
    make_files(tmp_path / "unified" / "build", {"memory.current": "20\n", "memory.max": "max\n"})
    result = read_cgroup_files("/build", "/build", root=str(tmp_path))
    assert (result["source"], result["current_bytes"]) == ("cgroup1", 10)


def test_v1_missing_file_raises(tmp_path: Path) -> None:
    """The caller turns this into the snapshot's error field."""
    make_files(tmp_path / "memory" / "build", {"memory.usage_in_bytes": "10\n"})
    with pytest.raises(FileNotFoundError):
        read_cgroup_files("/build", None, root=str(tmp_path))


# read_cgroup_files: cgroup v2


def v2_tree(root: Path, memory_max: str) -> None:
    make_files(root, {"cgroup.controllers": "cpuset cpu io memory pids\n"})
    make_files(
        root / UNIT.lstrip("/"),
        {
            "memory.current": "4096\n",
            "memory.max": memory_max,
            "memory.events": "low 0\nhigh 0\nmax 5\noom 1\noom_kill 2\noom_group_kill 0\n",
        },
    )


def test_v2_files_without_a_limit(tmp_path: Path) -> None:
    v2_tree(tmp_path, "max\n")
    assert read_cgroup_files(None, UNIT, root=str(tmp_path)) == {
        "source": "cgroup2",
        "cgroup": UNIT,
        "current_bytes": 4096,
        "max_bytes": None,
        "oom_kills": 2,
    }


def test_v2_files_with_a_limit(tmp_path: Path) -> None:
    v2_tree(tmp_path, "1073741824\n")
    result = read_cgroup_files(None, UNIT, root=str(tmp_path))
    assert (result["source"], result["max_bytes"]) == ("cgroup2", 1 << 30)


def test_v2_memory_events_without_oom_kill(tmp_path: Path) -> None:
    v2_tree(tmp_path, "max\n")
    (tmp_path / UNIT.lstrip("/") / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\n")
    assert read_cgroup_files(None, UNIT, root=str(tmp_path))["oom_kills"] is None


def test_v2_used_when_v1_has_no_memory_hierarchy(tmp_path: Path) -> None:
    v2_tree(tmp_path, "max\n")
    assert read_cgroup_files("/stale", UNIT, root=str(tmp_path))["source"] == "cgroup2"


def test_hybrid_v2_is_read_under_unified(tmp_path: Path) -> None:
    """Without cgroup.controllers at the root, v2 is the hybrid mount at root/unified."""
    v2_tree(tmp_path / "unified", "2097152\n")
    make_files(tmp_path / UNIT.lstrip("/"), {"memory.current": "1\n", "memory.max": "1\n"})
    result = read_cgroup_files(None, UNIT, root=str(tmp_path))
    assert (result["source"], result["current_bytes"], result["max_bytes"]) == (
        "cgroup2",
        4096,
        2097152,
    )


def test_no_cgroup_at_all(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"nix-daemon is in no memory cgroup"):
        read_cgroup_files(None, None, root=str(tmp_path))


def test_v1_path_only_without_memory_hierarchy(tmp_path: Path) -> None:
    v2_tree(tmp_path, "max\n")
    with pytest.raises(OSError, match=r"no memory cgroup"):
        read_cgroup_files("/build", None, root=str(tmp_path))
