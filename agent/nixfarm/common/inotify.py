"""A small inotify reader (libc through ctypes: the standard library has none).

Used to watch files other programs open, without opening them: the lock
files of Nix's build hook on a client (passes.py), the build logs Nix writes
on a builder (buildlog.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct

IN_CLOSE_WRITE = 0x00000008
IN_OPEN = 0x00000020
IN_CREATE = 0x00000100
IN_ISDIR = 0x40000000
IN_IGNORED = 0x00008000  # the watched file is gone (its watch with it)
IN_Q_OVERFLOW = 0x00004000
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then `len` bytes of name)


class InotifyUnavailable(Exception):
    """inotify cannot be used here (no libc function, or the kernel refuses)."""


class Inotify:
    """One non-blocking inotify instance."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        if name is None:
            raise InotifyUnavailable("no C library found for inotify")
        self._libc = ctypes.CDLL(name, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise InotifyUnavailable(f"inotify_init1: {os.strerror(ctypes.get_errno())}")

    def fileno(self) -> int:
        return int(self._fd)

    def close(self) -> None:
        os.close(self._fd)

    def add_watch(self, path: str, mask: int) -> int:
        """Watch `path` for the events in `mask`; the same wd again if it is watched already."""
        wd = int(self._libc.inotify_add_watch(self._fd, path.encode(), mask))
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        return wd

    def read(self) -> list[tuple[int, int]]:
        """(wd, mask) of every event queued now; none if there are none."""
        return [(wd, mask) for wd, mask, _ in self.read_named()]

    def read_named(self) -> list[tuple[int, int, str]]:
        """(wd, mask, name) of every event queued now; name is "" for the watched path itself."""
        events: list[tuple[int, int, str]] = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return events
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            offset = 0
            while offset + EVENT.size <= len(data):
                wd, mask, _, length = EVENT.unpack_from(data, offset)
                start = offset + EVENT.size
                name = data[start : start + length].split(b"\0", 1)[0].decode(errors="replace")
                events.append((wd, mask, name))
                offset = start + length
