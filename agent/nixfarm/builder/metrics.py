"""One snapshot of a builder: what a dispatcher needs to decide where builds go.

A `Collector` keeps what is expensive to set up (a netlink socket, a D-Bus
connection, the build users' UIDs, where nix-daemon's cgroup is) and takes a
snapshot in a few milliseconds: no subprocesses, a handful of small reads.

The snapshot is a plain dict, versioned by `SCHEMA` (snapshot.py, where
clients check it); README.md documents each field. Values that cannot be
read on this machine are null, with a reason in the section's `error`
field, rather than failing the whole snapshot; only a missing store is
fatal (a builder without a store is not a builder).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import version
from ..common.atomic import write_atomic
from ..common.errors import EnvironmentProblem
from ..common.nixconf import NixSettings, load_nix_settings
from ..common.snapshot import SCHEMA
from . import cgroups
from .config import AgentConfig
from .demand import read_demand
from .processes import ProcessTable


def read_loadavg() -> dict[str, float]:
    """The 1/5/15-minute load averages."""
    one, five, fifteen = os.getloadavg()
    return {"avg1": one, "avg5": five, "avg15": fifteen}


def read_psi(proc: str = "/proc") -> dict[str, float] | None:
    """PSI avg10 for cpu, memory and io, or None where the kernel has no PSI."""
    result: dict[str, float] = {}
    for resource in ("cpu", "memory", "io"):
        try:
            with open(f"{proc}/pressure/{resource}") as f:
                text = f.read()
        except OSError:
            return None
        for line in text.splitlines():
            kind, *pairs = line.split()
            for pair in pairs:
                name, _, value = pair.partition("=")
                if name == "avg10":
                    result[f"{resource}_{kind}_avg10"] = float(value)
    return result


def read_meminfo(proc: str = "/proc") -> dict[str, int]:
    """Total and available memory in bytes."""
    wanted = {"MemTotal": "total_bytes", "MemAvailable": "available_bytes"}
    result: dict[str, int] = {}
    with open(f"{proc}/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in wanted:
                result[wanted[key]] = int(rest.split()[0]) * 1024
                if len(result) == len(wanted):
                    break
    return result


def read_store_fs(store_dir: str) -> dict[str, Any]:
    """Free and total bytes and inodes of the filesystem holding the store."""
    try:
        st = os.statvfs(store_dir)
    except FileNotFoundError:
        raise EnvironmentProblem(
            f"Nix store {store_dir} does not exist; is Nix installed? "
            "(set store_dir in the agent config if it lives elsewhere)"
        ) from None
    except OSError as e:
        raise EnvironmentProblem(f"cannot stat Nix store {store_dir}: {e.strerror}") from None
    return {
        "path": store_dir,
        "free_bytes": st.f_bavail * st.f_frsize,
        "total_bytes": st.f_blocks * st.f_frsize,
        "free_inodes": st.f_favail,
        "total_inodes": st.f_files,
    }


def build_user_uids(group: str) -> frozenset[int]:
    """UIDs of the build users (members of `group`, or with it as primary group)."""
    try:
        entry = grp.getgrnam(group)
    except KeyError:
        return frozenset()
    uids = set()
    for name in entry.gr_mem:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            continue
    uids.update(p.pw_uid for p in pwd.getpwall() if p.pw_gid == entry.gr_gid)
    return frozenset(uids)


BUILDS_RECORD = "builds.json"  # in the agent's state_dir: builds that finished, as it saw them


class BuildHistory:
    """How long the running builds have run, and how long recent ones took.

    A dispatcher counts the recent ends to see how fast a builder's slots
    free up (README: "The formula"). A build counts as finished at the first
    look that misses it; it ended between that look and the one before, so
    its duration is taken at the midpoint: at most half an interval off. The
    agent service looks every second and keeps what it saw in its state
    directory (`save`), so that a stream started later knows the builder's
    recent builds too (`read_builds_record`).
    """

    KEEP = 64  # finished builds remembered, the most recent ones
    KEEP_FOR = 600.0  # seconds: what ran ten minutes ago says little about now

    def __init__(self, build_uids: frozenset[int], proc: str = "/proc") -> None:
        self.table = ProcessTable(build_uids, proc)
        self._tick = os.sysconf("SC_CLK_TCK")
        self._running: dict[tuple[int, int], float] = {}  # (build user, start) -> last seen
        self._finished: deque[tuple[float, float]] = deque(maxlen=self.KEEP)  # (ended, seconds)
        self.unsaved = False  # a build finished since the last save()

    def look(self) -> dict[str, Any]:
        """The snapshot's `builds` numbers now: active, ages_seconds, finished."""
        now = time.clock_gettime(time.CLOCK_BOOTTIME)  # the clock /proc start times count on
        self.table.look()
        builds = self.table.builds()
        running = {(key, started): now for key, started in builds.items()}
        for build, last_seen in self._running.items():
            if build not in running:
                self._finished.append((time.time(), (last_seen + now) / 2 - build[1] / self._tick))
                self.unsaved = True
        self._running = running
        while self._finished and time.time() - self._finished[0][0] > self.KEEP_FOR:
            self._finished.popleft()
        ages = sorted((now - started / self._tick for _, started in running), reverse=True)
        return {
            "active": len(running),
            "ages_seconds": [round(max(0.0, age), 2) for age in ages],
            "finished": ended_ago(list(self._finished)),
        }

    def save(self, state_dir: str) -> None:
        """Keep the finished builds where streams read them (atomically; readable by all)."""
        record = [[round(ended, 2), round(max(0.0, took), 2)] for ended, took in self._finished]
        write_atomic(os.path.join(state_dir, BUILDS_RECORD), json.dumps({"finished": record}).encode())
        self.unsaved = False


def ended_ago(finished: list[tuple[float, float]]) -> list[list[float]]:
    """(ended, took) pairs as the snapshot has them: [seconds since it ended, seconds it ran]."""
    now = time.time()
    return [[round(max(0.0, now - ended), 2), round(max(0.0, took), 2)] for ended, took in finished]


def read_builds_record(state_dir: str) -> list[tuple[float, float]] | None:
    """(ended, took) of the builds the agent saw finish in the last KEEP_FOR seconds.

    None when there is no record (no agent service, or an unreadable or
    malformed file): the stream then goes by what it saw itself.
    """
    try:
        with open(os.path.join(state_dir, BUILDS_RECORD)) as f:
            record = json.loads(f.read(1 << 16))["finished"]
        since = time.time() - BuildHistory.KEEP_FOR
        finished = [(float(ended), float(took)) for ended, took in record[-BuildHistory.KEEP :]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [(ended, took) for ended, took in finished if ended >= since and 0 <= took < 1e9] or None


def gc_limits(config: AgentConfig, store: dict[str, Any], nix: NixSettings) -> dict[str, int | None]:
    """The min-free and max-free the agent keeps (bytes); None where its GC is off."""
    from ..common.errors import UsageError
    from .gc import resolve_limits

    try:
        limits = resolve_limits(config, store, nix)
    except UsageError:
        limits = None
    return {
        "min_free_bytes": limits.min_free if limits else None,
        "max_free_bytes": limits.max_free if limits else None,
    }


def read_gc_state(state_dir: str) -> dict[str, Any]:
    """The store GC's last known state, as the agent left it in its state file."""
    state: dict[str, Any] = {
        "running": False,
        "last_run": None,
        "bytes_freed": None,
        "duration_seconds": None,
        "error": None,
    }
    try:
        with open(os.path.join(state_dir, "gc-state.json")) as f:
            saved = json.loads(f.read(1 << 16))
    except (OSError, ValueError):
        return state
    if isinstance(saved, dict):
        state.update({k: saved[k] for k in state if k in saved})
    return state


class NetworkCounters:
    """Bytes received and sent on the builder's interfaces.

    From /proc/net/dev, the kernel's per-interface 64-bit counters (the same
    as netlink's IFLA_STATS64) for the reader's network namespace: one small
    read, where a netlink link dump through pyroute2 cost ~4 ms per snapshot
    and ~130 ms and ~16 MiB to import.
    """

    def __init__(self, interfaces: tuple[str, ...], path: str = "/proc/self/net/dev") -> None:
        self._path = path
        self._interfaces = set(interfaces)
        self._last: tuple[float, int, int] | None = None
        with open(path, "rb"):  # unreadable here: no counters, said once at the start
            pass

    def close(self) -> None:
        pass

    def read(self) -> dict[str, Any]:
        """Counters since boot, and rates since the previous read (None on the first)."""
        rx = tx = 0
        with open(self._path, "rb") as f:
            lines = f.read(1 << 20).splitlines()[2:]  # after the two header lines
        for line in lines:
            name, _, counters = line.partition(b":")
            ifname = name.strip().decode(errors="replace")
            if (self._interfaces and ifname not in self._interfaces) or (
                not self._interfaces and ifname == "lo"
            ):
                continue
            fields = counters.split()
            rx += int(fields[0])  # receive bytes
            tx += int(fields[8])  # transmit bytes
        now = time.monotonic()
        rates: dict[str, float | None] = {"rx_bytes_per_second": None, "tx_bytes_per_second": None}
        if self._last is not None and now > self._last[0]:
            dt = now - self._last[0]
            rates = {
                "rx_bytes_per_second": max(0, rx - self._last[1]) / dt,
                "tx_bytes_per_second": max(0, tx - self._last[2]) / dt,
            }
        self._last = (now, rx, tx)
        return {"rx_bytes_total": rx, "tx_bytes_total": tx, **rates}


class Collector:
    """Takes snapshots; create once, call `snapshot()` as often as needed."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.warnings: list[str] = []
        self._warned: set[str] = set()
        # The demand of clients whose streams the agent serves itself (relay.py), beside
        # the records of the streams that run on their own.
        self.live_demand: Callable[[], dict[str, int]] | None = None
        self.build_uids = build_user_uids(config.build_users_group)
        # One record of builds per process: the agent's service loop looks through it too.
        self.builds = BuildHistory(self.build_uids)
        self._memory = cgroups.DaemonMemoryReader(config.nix_daemon_unit)
        try:
            self._network: NetworkCounters | None = NetworkCounters(config.network_interfaces)
        except OSError as e:
            self._network = None
            self.warnings.append(f"network counters unavailable: {e}")

    def close(self) -> None:
        if self._network:
            self._network.close()

    def snapshot(self) -> dict[str, Any]:
        """One snapshot as a JSON-ready dict (see README: "The metrics snapshot")."""
        store = read_store_fs(self.config.store_dir)
        nix = load_nix_settings(self.config.nix_conf_dir)
        memory = self._memory.read()
        if memory.get("error"):
            self.warnings.append(f"nix-daemon memory: {memory['error']}")
        return {
            "schema": SCHEMA,
            "agent_version": version(),
            "hostname": socket.gethostname(),
            "timestamp": time.time(),
            "systems": list(nix.systems),
            "features": list(nix.features),
            "cpus": len(os.sched_getaffinity(0)),
            "load": read_loadavg(),
            "psi": read_psi(),
            "memory": read_meminfo(),
            "store": store,
            "nix_daemon_memory": memory,
            "builds": {
                **self._look_at_builds(),
                "sessions_by_client": self.builds.table.sessions(),
                **self._demand(),
            },
            "nix_config": {
                "max_jobs": nix.max_jobs,
                "cores": nix.cores,
                "min_free_bytes": nix.min_free_bytes,
                "max_free_bytes": nix.max_free_bytes,
            },
            "network": self._network.read() if self._network else None,
            "gc": {**read_gc_state(self.config.state_dir), **gc_limits(self.config, store, nix)},
        }

    def _look_at_builds(self) -> dict[str, Any]:
        """The running builds as seen now; the finished ones, and whose each running one is
        (accounts.py), as the agent service saw them, if it runs."""
        from .accounts import read_running

        builds = self.builds.look()
        record = read_builds_record(self.config.state_dir)
        if record is not None:
            builds["finished"] = ended_ago(record)
        running = read_running(self.config.state_dir)
        if running is not None:
            builds["running"] = running
        return builds

    def _demand(self) -> dict[str, Any]:
        """The clients' builds waiting for a machine, where the agent keeps them (demand.py)."""
        counts = read_demand(self.config.state_dir)
        if self.live_demand is not None:
            counts = {**(counts or {}), **self.live_demand()}
        return {} if counts is None else {"demand_by_client": dict(sorted(counts.items()))}

    def take_warnings(self) -> list[str]:
        """Warnings not reported before: a stream says each problem once, not every interval."""
        new = [w for w in dict.fromkeys(self.warnings) if w not in self._warned]
        self._warned.update(new)
        self.warnings = []
        return new
