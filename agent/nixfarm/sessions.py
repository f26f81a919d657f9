"""Build sessions opening and closing on a builder, seen as they happen.

Before the gateway execs a Nix program for a client (`nix-daemon --stdio`,
`nix-store --serve`: one per remote build), it opens a mark file and leaves
it open across the exec, so the session's process holds it until it exits.
A stream that watches the mark with inotify sees every such session open
(IN_OPEN) and end (IN_CLOSE_NOWRITE, when its last holder is gone) without
polling /proc, and can send a snapshot then: a dispatcher hears that a slot
was taken or freed tens of milliseconds after it happened, not up to a
stream interval later, when other clients may already have sent builds to
the same slot (bench/README.md, "Scheduling").

The agent service makes the mark in its state directory (`make_mark`).
Where there is none, the gateway holds nothing and streams keep to their
interval.
"""

from __future__ import annotations

import contextlib
import os

MARK = "sessions"  # in the agent's state_dir


def mark_path(state_dir: str) -> str:
    return os.path.join(state_dir, MARK)


def make_mark(state_dir: str) -> None:
    """The agent: make the mark, an empty file every session may open to read."""
    fd = os.open(mark_path(state_dir), os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    os.fchmod(fd, 0o644)
    os.close(fd)


def hold_mark(state_dir: str) -> None:
    """Open the mark for the Nix program this process execs next; it closes when that ends."""
    try:
        fd = os.open(mark_path(state_dir), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return  # no agent has made it: the streams snapshot on their interval alone
    os.set_inheritable(fd, True)


class SessionEvents:
    """A stream's watch on the mark; OSError (or InotifyUnavailable) where it cannot watch it."""

    def __init__(self, state_dir: str) -> None:
        from .inotify import IN_CLOSE_NOWRITE, IN_OPEN, Inotify  # ctypes: not on the gateway's path

        self._inotify = Inotify()
        try:
            self._inotify.add_watch(mark_path(state_dir), IN_OPEN | IN_CLOSE_NOWRITE)
        except OSError:
            self._inotify.close()
            raise

    def fileno(self) -> int:
        return self._inotify.fileno()

    def seen(self) -> bool:
        """Whether a session opened or ended since the last call."""
        return bool(self._inotify.read())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._inotify.close()
