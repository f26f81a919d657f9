"""Whose is it: the builds running on this builder and the SSH traffic, per client.

A build belongs to the client whose gateway session started the nix-daemon
worker it runs under. Nothing in a build says so, so the agent (root) follows
what Nix and the kernel leave behind:

- the build's processes run as a build user; their environment names the
  derivation (`name`) and its outputs (`outputs`, then one variable each);
- the worker building it keeps those outputs as temp roots, in
  /nix/var/nix/temproots/<worker PID> (Nix's own GC reads them too);
- the worker serves one connection to the daemon socket, whose other end is
  the `nix-daemon --stdio` or `nix-store --serve` the gateway exec'd, and
  sock_diag names the peer of a Unix socket;
- the gateway recorded which client that process serves (sessions.py).

The connection a session runs over is the TCP socket its nearest sshd
ancestor holds (traffic.py counts its bytes).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from .sessions import start_ticks

TEMPROOTS = "/nix/var/nix/temproots"
# Nix's auto-allocate-uids hands each build a block of 2^16 UIDs from this start.
AUTO_UID_START = 872415232
AUTO_UID_BLOCK = 1 << 16
MAX_ENVIRON = 1 << 20
MAX_TEMPROOTS = 1 << 22  # bytes read per worker's temp roots file
MAX_NAME = 200  # characters kept of a derivation name
ANCESTORS = 4  # session process -> sh -> sshd: user@notty holds the connection


@dataclass
class BuildProcesses:
    """One running build as its processes show it."""

    top: int  # PID of its oldest process (the builder)
    started: int  # its start, clock ticks since boot
    cpu_ticks: int = 0  # user + system time of its live processes and the children they reaped


def _stat(pid: str, proc: str) -> tuple[int, int]:
    """(start ticks, CPU ticks) of a process, from /proc/PID/stat."""
    with open(f"{proc}/{pid}/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()
    # utime, stime, cutime, cstime are fields 14-17; starttime is 22 (proc(5)).
    return int(fields[19]), sum(int(v) for v in fields[11:15])


def build_processes(pids: list[int], proc: str = "/proc") -> BuildProcesses | None:
    """One build's processes (ProcessTable.build_pids) as they are now; None if all have exited."""
    build: BuildProcesses | None = None
    for pid in pids:
        try:
            started, cpu = _stat(str(pid), proc)
        except (OSError, IndexError, ValueError):  # it exited while we looked
            continue
        if build is None:
            build = BuildProcesses(pid, started)
        elif (started, pid) < (build.started, build.top):
            build.top, build.started = pid, started
        build.cpu_ticks += cpu
    return build


def read_environ(pid: int, proc: str = "/proc") -> dict[str, str]:
    """A process's environment (what a build's builder got from Nix)."""
    with open(f"{proc}/{pid}/environ", "rb") as f:
        data = f.read(MAX_ENVIRON)
    env = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def derivation_of(env: dict[str, str]) -> tuple[str, list[str]]:
    """The derivation's name and its output paths, from its builder's environment."""
    outputs = [env[o] for o in env.get("outputs", "out").split() if env.get(o, "").startswith("/")]
    return env.get("name", "?")[:MAX_NAME], outputs


def workers_building(paths: set[str], temproots: str = TEMPROOTS) -> dict[str, int]:
    """For each of `paths`, the PID of the Nix process holding it as a temp root."""
    found: dict[str, int] = {}
    try:
        names = os.listdir(temproots)
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(temproots, name), "rb") as f:
                roots = f.read(MAX_TEMPROOTS)
        except OSError:
            continue
        for path in paths:
            if path.encode() in roots:
                found[path] = int(name)
    return found


def socket_inodes(pid: int, proc: str = "/proc") -> set[int]:
    """Inodes of the sockets a process has open."""
    inodes: set[int] = set()
    try:
        fds = os.listdir(f"{proc}/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"{proc}/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def unix_peers() -> dict[int, int]:
    """Every connected Unix socket of this network namespace: inode -> its peer's inode."""
    from pyroute2 import DiagSocket  # ~130 ms to import: only when a build is new

    with DiagSocket() as ds:
        ds.bind()
        stats = ds.get_sock_stats(family=socket.AF_UNIX)
    peers = {}
    for s in stats:
        peer = s.get_attr("UNIX_DIAG_PEER")
        if peer:
            peers[s["udiag_ino"]] = peer
    return peers


def client_of_worker(worker: int, sessions: dict[int, str], proc: str = "/proc") -> str | None:
    """The client of the session at the other end of a worker's daemon connection, if any."""
    mine = socket_inodes(worker, proc)
    if not mine:
        return None
    peers = unix_peers()
    theirs = {peers[i] for i in mine if i in peers}
    for pid, client in sessions.items():
        if theirs & socket_inodes(pid, proc):
            return client
    return None


def connection_of(pid: int, connections: Mapping[int, object], proc: str = "/proc") -> int | None:
    """The TCP connection (socket inode) a session runs over: held by its nearest sshd ancestor."""
    for _ in range(ANCESTORS):
        inodes = socket_inodes(pid, proc) & connections.keys()
        if inodes:
            return min(inodes)
        try:
            with open(f"{proc}/{pid}/stat", "rb") as f:
                pid = int(f.read().rpartition(b")")[2].split()[1])  # field 4: the parent
        except (OSError, IndexError, ValueError):
            return None
        if pid <= 1:
            return None
    return None


def is_alive(pid: int, started: int, proc: str = "/proc") -> bool:
    try:
        return start_ticks(pid, proc) == started
    except (OSError, IndexError, ValueError):
        return False
