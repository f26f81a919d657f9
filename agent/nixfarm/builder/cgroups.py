"""nix-daemon's memory use and cap, from systemd where it runs, else from cgroup files.

Where systemd is PID 1 (NixOS) the cap is a unit property, so we ask systemd
over D-Bus. Elsewhere we find the nix-daemon process, read which cgroup it is
in from /proc/PID/cgroup, and read that cgroup's files: cgroup v2
(memory.current, memory.max) or, where the memory controller is still on v1,
memory.usage_in_bytes and memory.limit_in_bytes.
"""

from __future__ import annotations

import os
import time
from typing import Any

CGROUP_ROOT = "/sys/fs/cgroup"
# v1 reports "no limit" as a huge page-aligned number; anything this large is no cap.
V1_UNLIMITED = 1 << 62
UINT64_MAX = (1 << 64) - 1
SEARCH_EVERY = 30.0  # seconds between searches for a nix-daemon that was not found


def _read_int_file(path: str) -> int | None:
    """An integer cgroup file; None for "max" (no limit)."""
    with open(path) as f:
        text = f.read().strip()
    return None if text == "max" else int(text)


def _oom_kills(path: str) -> int | None:
    """The cgroup's OOM-kill count (v2 memory.events, v1 memory.oom_control)."""
    for name in ("memory.events", "memory.oom_control"):
        try:
            with open(os.path.join(path, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except OSError:
            continue
    return None


def parse_proc_cgroup(text: str) -> tuple[str | None, str | None]:
    """(v1 memory cgroup path, v2 cgroup path) from the text of /proc/PID/cgroup."""
    v1 = v2 = None
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v1, v2


def read_cgroup_files(v1_path: str | None, v2_path: str | None, root: str = CGROUP_ROOT) -> dict[str, Any]:
    """Memory current/max of a cgroup, v1 where memory is still there, else v2."""
    if v1_path is not None and os.path.isdir(os.path.join(root, "memory")):
        base = os.path.join(root, "memory", v1_path.lstrip("/"))
        limit = _read_int_file(os.path.join(base, "memory.limit_in_bytes"))
        return {
            "source": "cgroup1",
            "cgroup": v1_path,
            "current_bytes": _read_int_file(os.path.join(base, "memory.usage_in_bytes")),
            "max_bytes": None if limit is None or limit >= V1_UNLIMITED else limit,
            "oom_kills": _oom_kills(base),
        }
    if v2_path is None:
        raise OSError("nix-daemon is in no memory cgroup")
    # Pure v2 mounts at the root; hybrid systems mount it at .../unified.
    v2_root = (
        root if os.path.exists(os.path.join(root, "cgroup.controllers")) else os.path.join(root, "unified")
    )
    base = os.path.join(v2_root, v2_path.lstrip("/"))
    return {
        "source": "cgroup2",
        "cgroup": v2_path,
        "current_bytes": _read_int_file(os.path.join(base, "memory.current")),
        "max_bytes": _read_int_file(os.path.join(base, "memory.max")),
        "oom_kills": _oom_kills(base),
    }


def systemd_memory_dir(control_group: str, root: str = CGROUP_ROOT) -> str:
    """The directory with the memory files of a systemd unit's cgroup.

    systemd's ControlGroup property is one path, the same in every hierarchy.
    The memory files are under the v2 mount where /sys/fs/cgroup is cgroup2,
    else under the v1 memory hierarchy where the memory controller is still on
    v1 (legacy and hybrid systems, e.g. this Debian), else under the hybrid
    v2 mount at .../unified.
    """
    relative = control_group.lstrip("/")
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        return os.path.join(root, relative)
    if os.path.isdir(os.path.join(root, "memory")):
        return os.path.join(root, "memory", relative)
    return os.path.join(root, "unified", relative)


def _proc_stat(pid: str) -> tuple[str, int]:
    """(comm, ppid) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    comm = text[text.index("(") + 1 : text.rindex(")")]
    ppid = int(text[text.rindex(")") + 2 :].split()[1])
    return comm, ppid


def find_nix_daemon_pid() -> int | None:
    """The main nix-daemon process: root's nix-daemon whose parent is not one."""
    candidates: dict[int, int] = {}
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat(follow_symlinks=False).st_uid != 0:
                    continue
                comm, ppid = _proc_stat(entry.name)
            except (OSError, ValueError):
                continue
            if comm == "nix-daemon":
                candidates[int(entry.name)] = ppid
    mains = [pid for pid, ppid in candidates.items() if ppid not in candidates]
    return min(mains) if mains else None


class DaemonMemoryReader:
    """Reads nix-daemon's memory; remembers where to look between reads."""

    def __init__(self, unit: str) -> None:
        self._unit = unit
        self._systemd: Any = None
        self._pid: int | None = None
        self._searched = -SEARCH_EVERY  # when /proc was last searched for nix-daemon (monotonic)
        if os.path.isdir("/run/systemd/system"):
            self._systemd = _connect_systemd(unit)

    def read(self) -> dict[str, Any]:
        """{"source", "cgroup", "current_bytes", "max_bytes", "oom_kills", "error"}."""
        empty: dict[str, Any] = {
            "source": None,
            "cgroup": None,
            "current_bytes": None,
            "max_bytes": None,
            "oom_kills": None,
            "error": None,
        }
        try:
            if self._systemd is not None:
                return {**empty, **self._read_systemd()}
            return {**empty, **self._read_files()}
        except (OSError, ValueError) as e:
            where = getattr(e, "filename", None)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            return {**empty, "error": f"{where}: {reason}" if where else reason}

    def _read_systemd(self) -> dict[str, Any]:
        unit = self._systemd
        current = int(unit.MemoryCurrent)
        limit = int(unit.MemoryMax)
        cgroup = str(unit.ControlGroup)
        oom = _oom_kills(systemd_memory_dir(cgroup, CGROUP_ROOT)) if cgroup else None
        return {
            "source": "systemd",
            "cgroup": cgroup or None,
            "current_bytes": None if current == UINT64_MAX else current,
            "max_bytes": None if limit == UINT64_MAX else limit,
            "oom_kills": oom,
        }

    def _read_files(self) -> dict[str, Any]:
        if self._pid is None or not _is_nix_daemon(self._pid):
            # A search reads every process's stat: not at every snapshot while there is none.
            if time.monotonic() - self._searched < SEARCH_EVERY:
                raise OSError("no nix-daemon process found")
            self._searched = time.monotonic()
            self._pid = find_nix_daemon_pid()
        if self._pid is None:
            raise OSError("no nix-daemon process found")
        with open(f"/proc/{self._pid}/cgroup") as f:
            v1, v2 = parse_proc_cgroup(f.read())
        return read_cgroup_files(v1, v2)


def _is_nix_daemon(pid: int) -> bool:
    try:
        return _proc_stat(str(pid))[0] == "nix-daemon"
    except (OSError, ValueError):
        return False


def _connect_systemd(unit: str) -> Any:
    """A pydbus proxy for the unit, or None where D-Bus or pydbus is missing."""
    try:
        import pydbus
    except ImportError:
        return None
    try:
        bus = pydbus.SystemBus()
        manager = bus.get("org.freedesktop.systemd1")
        path = manager.LoadUnit(unit)
        return bus.get("org.freedesktop.systemd1", path)
    except Exception:  # GLib.Error and friends: no bus, no unit; fall back to files
        return None
