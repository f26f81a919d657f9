"""The processes a builder's numbers come from: its builds and its build sessions.

A build is the processes of one build user (or one block of auto-allocated
UIDs); a build session is a nix-daemon or nix-store the gateway started for
a client, with NIXFARM_CLIENT in its environment. The snapshot (metrics.py)
counts both; the accounts (accounts.py) add up each build's CPU time.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .attribution import AUTO_UID_BLOCK, AUTO_UID_START

SESSION_PROGRAMS = ("nix-daemon", "nix-store")
CLIENT_VAR = b"NIXFARM_CLIENT="


def _session_client(environ_path: str) -> str | None:
    """The client a session process's environment names, if any."""
    try:
        with open(environ_path, "rb") as f:
            environ = f.read(1 << 20)
    except OSError:
        return None
    for var in environ.split(b"\0"):
        if var.startswith(CLIENT_VAR):
            return var[len(CLIENT_VAR) :].decode(errors="replace")
    return None


class ProcessTable:
    """The processes a snapshot counts (builds and build sessions), kept between snapshots.

    Listing /proc is cheap (its names); opening every process's files is
    not: with 3,000 processes a full look took ~45 ms, most of a snapshot.
    So each process is looked at when it first appears, and again while it
    is young (SETTLE seconds): the moments a process can still turn into a
    build (Nix's build child setuid()s to its build user right after fork)
    or into a build session (the gateway exec()s nix-daemon or nix-store).
    After that its kind is kept until it exits. Every REFRESH seconds all
    are looked at again, in case a PID was reused between two looks.

    Kinds: a build (its build user, or auto-allocated UID block as a
    negative key, and its start time: /proc/PID/stat field 22, clock ticks
    since boot), a build session (the client the gateway named in its
    environment), or nothing.
    """

    SETTLE = 10.0  # seconds: older processes have done their setuid() and exec()
    REFRESH = 300.0

    def __init__(self, build_uids: frozenset[int], proc: str = "/proc") -> None:
        self._build_uids = build_uids
        self._proc = proc
        self._tick = os.sysconf("SC_CLK_TCK")
        self._me = os.geteuid()
        self._kinds: dict[int, tuple[str, Any, int] | None] = {}  # pid -> (kind, key, start) or None
        self._young: set[int] = set()
        self._refreshed = 0.0

    def look(self) -> None:
        """Bring the table up to date with /proc."""
        pids = {int(name) for name in os.listdir(self._proc) if name.isdigit()}
        if time.monotonic() - self._refreshed > self.REFRESH:
            self._kinds, self._young, self._refreshed = {}, set(), time.monotonic()
        for pid in self._kinds.keys() - pids:
            del self._kinds[pid]
        self._young &= pids
        now = time.clock_gettime(time.CLOCK_BOOTTIME)  # the clock /proc start times count on
        for pid in (pids - self._kinds.keys()) | self._young:
            self._young.discard(pid)
            try:
                self._kinds[pid] = self._classify(pid, now)
            except (OSError, IndexError, ValueError):  # it exited while we looked
                self._kinds.pop(pid, None)

    def _classify(self, pid: int, now: float) -> tuple[str, Any, int] | None:
        """What `pid` is: a build, a build session or (None) nothing we count."""
        uid = os.stat(f"{self._proc}/{pid}").st_uid
        with open(f"{self._proc}/{pid}/stat", "rb") as f:
            text = f.read()
        # After the command name, which may hold spaces and ')'.
        comm = text[text.find(b"(") + 1 : text.rfind(b")")]
        started = int(text.rpartition(b")")[2].split()[19])
        if uid in self._build_uids:
            return ("build", uid, started)
        if uid >= AUTO_UID_START:
            return ("build", -1 - (uid - AUTO_UID_START) // AUTO_UID_BLOCK, started)
        if now - started / self._tick < self.SETTLE:
            self._young.add(pid)
        # Build sessions: ours, or as root anyone's but a build user's (builds are untrusted
        # code, and could name any client).
        if comm.decode(errors="replace") in SESSION_PROGRAMS and (self._me == 0 or uid == self._me):
            client = _session_client(f"{self._proc}/{pid}/environ")
            if client is not None:
                self._young.discard(pid)
                return ("session", client, started)
        return None

    def builds(self) -> dict[int, int]:
        """The builds running now: build user -> when its oldest process started.

        Nix runs each build under its own build user (or its own block of
        auto-allocated UIDs) and kills every process of that user when the
        build ends, so the distinct build users with a process are the builds
        running. The start time tells a build from the next one that reuses
        its build user.
        """
        builds: dict[int, int] = {}
        for kind in self._kinds.values():
            if kind is not None and kind[0] == "build":
                _, key, started = kind
                builds[key] = min(started, builds.get(key, started))
        return builds

    def build_pids(self) -> dict[int, list[int]]:
        """The processes of each running build (keys as in builds())."""
        pids: dict[int, list[int]] = {}
        for pid, kind in self._kinds.items():
            if kind is not None and kind[0] == "build":
                pids.setdefault(kind[1], []).append(pid)
        return pids

    def sessions(self) -> dict[str, int]:
        """Open build sessions (Nix protocol connections) per client, as the gateway tagged them.

        The gateway execs nix-daemon --stdio / nix-store --serve with
        NIXFARM_CLIENT in the environment; Nix's build hook holds one such
        session per remote build. We can read the environment of our own
        processes (the gateway runs as the builder user) or, as root, of all
        of them but the build users'.
        """
        counts: dict[str, int] = {}
        for kind in self._kinds.values():
            if kind is not None and kind[0] == "session":
                counts[kind[1]] = counts.get(kind[1], 0) + 1
        return counts
