"""When was each store path last used? Sampled from what running builds refer to.

Registration time says when a path arrived, not whether builds still need
it, and atime is no help either: Nix sets every store file's mtime to 1, so
with relatime the kernel updates atime at most once a day. We use the
evidence Nix's own GC uses to decide what is alive, with a clock on it: the
store paths that build processes refer to (their environment, which lists
every input, command line, executable, working directory and mapped files)
and Nix's temp roots (paths a client is adding or building right now). A path
seen in use marks its whole closure used at that moment.

Records persist in the state directory across restarts; a corrupt file is
replaced with a warning, never a crash.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable

from ..common import store
from ..common.atomic import write_atomic

# Nix's base-32 alphabet (no e, o, u, t) and the characters store names may have.
STORE_PATH = re.compile(rb"/nix/store/([0-9a-df-np-sv-z]{32}-[A-Za-z0-9+\-._?=]+)")
TEMPROOTS_DIR = "/nix/var/nix/temproots"
MAX_READ = 1 << 20  # per /proc file: an environment or a maps file is far smaller

log = logging.getLogger("nixfarm.agent")


def names_in(data: bytes) -> set[str]:
    """Store path names ("hash-name") mentioned in `data`."""
    return {m.decode() for m in STORE_PATH.findall(data)}


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_READ)
    except OSError:  # the process ended, or is not ours to read
        return b""


def _link(path: str) -> bytes:
    try:
        return os.readlink(path).encode()
    except OSError:
        return b""


def paths_in_use(build_uids: frozenset[int], proc: str = "/proc") -> set[str]:
    """Names of the store paths running builds and Nix clients refer to now."""
    found: set[str] = set()
    with os.scandir(proc) as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat(follow_symlinks=False).st_uid not in build_uids:
                    continue
            except OSError:
                continue
            base = f"{proc}/{entry.name}"
            for name in ("environ", "cmdline", "maps"):
                found |= names_in(_read(f"{base}/{name}"))
            for name in ("exe", "cwd"):
                found |= names_in(_link(f"{base}/{name}"))
    try:
        with os.scandir(TEMPROOTS_DIR) as roots:
            for root in roots:
                found |= names_in(_read(root.path))
    except OSError:
        pass
    return found


class UsageRecords:
    """Last-use times of store paths (by name), kept in `state_dir/usage.json`."""

    def __init__(self, state_dir: str, store_dir: str = "/nix/store") -> None:
        self.path = os.path.join(state_dir, "usage.json")
        self.store_dir = store_dir
        self.last_used: dict[str, float] = {}
        self._closures: dict[str, list[str]] = {}
        self.dirty = False
        # The agent's main loop records while its GC thread forgets and saves.
        self._lock = threading.Lock()

    def load(self) -> None:
        """Read the records; a missing file is empty, a corrupt one is replaced."""
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read())
            if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, int | float) for k, v in data.items()
            ):
                raise ValueError("not an object of store path names to times")
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("usage records %s are unreadable (%s); starting them afresh", self.path, e)
            self.dirty = True
            return
        self.last_used = {k: float(v) for k, v in data.items()}

    def save(self) -> None:
        """Write the records atomically (temp file, fsync, rename), if they changed."""
        with self._lock:
            if not self.dirty:
                return
            data = json.dumps(self.last_used, separators=(",", ":")).encode()
            self.dirty = False
        write_atomic(self.path, data)

    def record(self, names: Iterable[str], now: float | None = None) -> None:
        """Mark `names`, and everything each of them references, used at `now`."""
        now = time.time() if now is None else now
        members = [m for name in names for m in self._closure(name)]
        with self._lock:
            for member in members:
                if self.last_used.get(member, 0.0) < now:
                    self.last_used[member] = now
                    self.dirty = True

    def _closure(self, name: str) -> list[str]:
        # Closures never change for a valid path: ask the database once per path.
        # A path seen before it is valid (an output being built, an input being
        # copied in) is asked again next time, once its references are known.
        if name in self._closures:
            return self._closures[name]
        try:
            members = [os.path.basename(p) for p in store.closure(f"{self.store_dir}/{name}")]
        except store.StoreError:
            members = []
        if members:
            self._closures[name] = members
        return members or [name]

    def forget(self, names: Iterable[str]) -> None:
        """Drop records of deleted paths."""
        with self._lock:
            for name in names:
                if self.last_used.pop(name, None) is not None:
                    self.dirty = True
                self._closures.pop(name, None)
