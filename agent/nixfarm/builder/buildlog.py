"""Every build this builder's Nix runs, as it opens and closes the build's log.

Nix writes a log for each build it runs (`keep-build-log`, on by default and
on NixOS) to <log dir>/drvs/<first 2 characters>/<rest of the .drv name>.bz2,
opening it (created, or truncated for a rebuild) when the builder starts and
closing it when the build is over. inotify tells us both at once, so even a
build of a few milliseconds is seen; sampling processes once a second would
miss it.

At the start, the worker building it is still alive and keeps the .drv and
its outputs as temp roots in /nix/var/nix/temproots/<worker PID>: that file
names the worker, and so the session and client (attribution.py), and the
outputs, whose validity after the end tells a finished build from a failed one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ..common.inotify import IN_CLOSE_WRITE, IN_CREATE, IN_ISDIR, IN_OPEN, IN_Q_OVERFLOW, Inotify

LOG_DIR = "/nix/var/log/nix/drvs"
STORE = "/nix/store/"
# Logs written this many seconds before a directory is first watched are of builds
# that started just before (the first build on a machine makes the directories).
YOUNG = 5.0


@dataclass
class LogEvent:
    kind: str  # "start" | "end"
    drv: str  # the derivation's file name: <hash>-<name>.drv
    time: float  # epoch seconds


def drv_name(drv: str) -> str:
    """The derivation's name: its file name without the hash and ".drv"."""
    return drv.partition("-")[2].removesuffix(".drv")


class BuildLogWatch:
    """inotify on the log directory and its subdirectories; `read()` the starts and ends."""

    def __init__(self, log_dir: str = LOG_DIR) -> None:
        self.log_dir = log_dir
        self._inotify = Inotify()
        self._dirs: dict[int, str] = {}  # watch -> the 2-character subdirectory
        self._top = -1  # the watch on log_dir itself, once it exists
        self._waiting = -1  # until then, the watch on its nearest existing parent

    def fileno(self) -> int:
        return self._inotify.fileno()

    def close(self) -> None:
        self._inotify.close()

    @property
    def watching(self) -> bool:
        return self._top >= 0

    def start(self) -> list[LogEvent]:
        """Watch the log directory if it exists now, else its nearest parent for its coming;
        the builds that started just before."""
        if self.watching:
            return []
        try:
            self._top = self._inotify.add_watch(self.log_dir, IN_CREATE)
            subdirs = sorted(os.listdir(self.log_dir))
        except OSError:  # no build has run on this machine yet: Nix makes it with the first
            self._wait_for_log_dir()
            return []
        return [e for d in subdirs for e in self._watch_subdir(d)]

    def _wait_for_log_dir(self) -> None:
        parent = os.path.dirname(self.log_dir)
        while parent != os.path.dirname(parent):
            try:
                self._waiting = self._inotify.add_watch(parent, IN_CREATE)
                return
            except OSError:
                parent = os.path.dirname(parent)

    def read(self) -> list[LogEvent]:
        """The builds that started or ended since the last read."""
        events = self.start()
        now = time.time()
        for wd, mask, name in self._inotify.read_named():
            if mask & IN_Q_OVERFLOW:
                continue  # events were lost; the ones after still count
            if wd == self._waiting and not self.watching:
                events += self.start()  # a directory on the way to log_dir was made
            elif wd == self._top:
                if mask & IN_CREATE and mask & IN_ISDIR:
                    events += self._watch_subdir(name)
            elif wd in self._dirs and name.endswith((".drv", ".drv.bz2")):
                drv = self._dirs[wd] + name.removesuffix(".bz2")
                if mask & IN_CLOSE_WRITE:
                    events.append(LogEvent("end", drv, now))
                elif mask & IN_OPEN and self._is_new(os.path.join(self.log_dir, self._dirs[wd], name)):
                    events.append(LogEvent("start", drv, now))
        return events

    def _watch_subdir(self, subdir: str) -> list[LogEvent]:
        """Watch a subdirectory; logs written in it the last seconds before are starts too."""
        path = os.path.join(self.log_dir, subdir)
        try:
            self._dirs[self._inotify.add_watch(path, IN_OPEN | IN_CLOSE_WRITE)] = subdir
            names = os.listdir(path)
        except OSError:
            return []
        now = time.time()
        return [
            LogEvent("start", subdir + name.removesuffix(".bz2"), now)
            for name in names
            if name.endswith((".drv", ".drv.bz2"))
            and self._written_since(os.path.join(path, name), now - YOUNG)
        ]

    @staticmethod
    def _is_new(path: str) -> bool:
        """Opened for a build: empty (just created or truncated), not a log someone reads."""
        try:
            return os.stat(path).st_size == 0
        except OSError:
            return False

    @staticmethod
    def _written_since(path: str, since: float) -> bool:
        try:
            return os.stat(path).st_mtime >= since
        except OSError:
            return False


def worker_of(drv: str, temproots: str) -> tuple[int, list[str]] | None:
    """The Nix process building `drv` (it keeps it as a temp root), and the outputs it keeps."""
    target = (STORE + drv).encode()
    try:
        names = os.listdir(temproots)
    except OSError:
        return None
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(temproots, name), "rb") as f:
                roots = f.read(1 << 22).split(b"\0")
        except OSError:
            continue
        if target in roots:
            # Nix adds the outputs as temp roots right after the derivation; inputs copied
            # in for it came before.
            after = roots[roots.index(target) + 1 :]
            return int(name), outputs_among(drv, [r.decode(errors="replace") for r in after])
    return None


def outputs_among(drv: str, paths: list[str]) -> list[str]:
    """The paths that are outputs of `drv` by their names: <name> or <name>-<output>."""
    name = drv_name(drv)
    found = []
    for path in paths:
        if not path.startswith(STORE) or path.endswith(".drv"):
            continue
        path_name = path[len(STORE) :].partition("-")[2]
        if (path_name == name or path_name.startswith(name + "-")) and path not in found:
            found.append(path)
    return found
