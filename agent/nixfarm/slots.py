"""Hold back builder slots in Nix's own load accounting.

Nix's build hook counts a machine's load by trying to lock one file per slot
(`maxJobs` of them) under the store's `current-load` directory; a slot whose
lock it cannot take is busy. It does this for every build it is asked about,
while it reads the machines file only once per hook process, and keeps that
list for as long as it answers "postpone" (src/build-remote/build-remote.cc).
So the dispatcher lists each builder with its full capacity and holds the
locks of the slots this client must leave to others: every request sees the
current allowance, also in a hook that started long ago.

The lock file names are Nix's: `<uri with / as _>-<slot>` (CppNix 2.x: the same in
2.8 and 2.26, whose Machine renders its store reference back to the same URI;
tests/test_slots.py runs both), and
Lix's `<first 48 chars of that>-<16 chars of the URI's sha256, Nix base32>-<slot>`.
Both are held; the one the running Nix does not use costs an open file.

The locks Nix's hooks hold are this client's builds in flight, one per
remote build from the moment a hook picks the slot until it has copied the
outputs back. `SlotHolds.taken_by_nix` reads them from /proc/locks, which
lists every flock without touching the files: a probe that took a lock,
however briefly, could make a hook that looks at that moment find the slot
busy and postpone its build for a whole poll interval.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import resource
import time

DEFAULT_DIR = "/nix/var/nix/current-load"
PROC_LOCKS = "/proc/locks"
INODES_FOR = 10.0  # seconds a slot file's inode is trusted before it is looked up again
_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"  # Nix's alphabet: no e, o, u, t


def nix_base32(data: bytes) -> str:
    """Nix's base-32 encoding (least significant 5 bits last)."""
    length = (len(data) * 8 - 1) // 5 + 1
    chars = []
    for n in range(length - 1, -1, -1):
        byte, bit = divmod(n * 5, 8)
        c = data[byte] >> bit
        if byte + 1 < len(data):
            c |= data[byte + 1] << (8 - bit)
        chars.append(_BASE32[c & 0x1F])
    return "".join(chars)


def lock_prefixes(store_uri: str) -> tuple[str, str]:
    """The slot lock file names of `store_uri` without "-<slot>": CppNix's, Lix's."""
    escaped = store_uri.replace("/", "_")
    digest = nix_base32(hashlib.sha256(store_uri.encode()).digest())
    return escaped, f"{escaped[:48]}-{digest[:16]}"


def raise_open_file_limit() -> None:
    """Every held slot is an open file (two): lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def flocked_inodes(path: str = PROC_LOCKS) -> set[int]:
    """The inode numbers of every file someone holds a flock on now.

    A line is `N: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF`;
    one that waits for a lock has `->` after `N:`. The device is left out:
    /proc/locks names the filesystem's, which on btrfs is not the one stat()
    reports (each subvolume has its own), and another file with the same
    inode number holding a flock at the same time is a rare, harmless
    mistake (one build counted too many for an interval).
    """
    held = set()
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) < 6 or fields[1] != "FLOCK":
                continue
            with contextlib.suppress(ValueError, IndexError):
                held.add(int(fields[5].split(":")[2]))
    return held


class SlotHolds:
    """The slot locks this process holds, per lock file prefix."""

    def __init__(self, directory: str = DEFAULT_DIR) -> None:
        self.directory = directory
        self._held: dict[str, dict[int, int]] = {}  # prefix -> slot -> fd
        self._inodes: dict[str, tuple[int, float]] = {}  # lock file name -> (inode, looked up at)
        self._own_opens: dict[str, int] = {}  # lock file name -> opens since take_own_opens()

    def taken_by_nix(self, store_uri: str, slots: int, flocked: set[int]) -> frozenset[str]:
        """The lock files of slots 0..slots-1 of `store_uri` that someone else holds:
        Nix's hooks, for this client's builds in flight there. `flocked` is
        flocked_inodes(), read once for all builders."""
        taken = set()
        for prefix in lock_prefixes(store_uri):
            held = self._held.get(prefix, {})
            for slot in range(slots):
                name = f"{prefix}-{slot}"
                if slot not in held and self._inode(name) in flocked:
                    taken.add(name)
        return frozenset(taken)

    def _inode(self, name: str) -> int | None:
        known = self._inodes.get(name)
        now = time.monotonic()
        if known and now - known[1] < INODES_FOR:
            return known[0]
        try:
            inode = os.stat(os.path.join(self.directory, name)).st_ino
        except OSError:
            return None  # no hook has opened it yet, so none holds it
        self._inodes[name] = (inode, now)
        return inode

    def hold(self, store_uri: str, slots: int, count: int) -> int:
        """Hold `count` of the slots 0..slots-1 of `store_uri` (the highest ones: Nix
        takes the lowest free one), releasing the rest. Slots that Nix holds for
        running builds cannot be taken; returns how many this process holds (the
        smallest over both namings)."""
        return min(self._hold(prefix, slots, count) for prefix in lock_prefixes(store_uri))

    def _hold(self, prefix: str, slots: int, count: int) -> int:
        held = self._held.setdefault(prefix, {})
        count = max(0, min(count, slots))
        # Let go of slots beyond the capacity, then of the lowest ones (Nix tries those first).
        beyond = [slot for slot in held if slot >= slots]
        lowest = sorted(slot for slot in held if slot < slots)[: max(0, len(held) - len(beyond) - count)]
        for slot in beyond + lowest:
            os.close(held.pop(slot))  # closing the file drops its flock
        for slot in range(slots - 1, -1, -1):
            if len(held) >= count:
                break
            if slot not in held and (fd := self._try_lock(f"{prefix}-{slot}")) is not None:
                held[slot] = fd
        return len(held)

    def _try_lock(self, name: str) -> int | None:
        # As Nix opens it (O_CREAT, 0600); flock, as Nix's lockFile() does.
        fd = os.open(os.path.join(self.directory, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._own_opens[name] = self._own_opens.get(name, 0) + 1  # not a pass of Nix's hook (passes.py)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def take_own_opens(self) -> dict[str, int]:
        """How often this process opened each lock file since the last call."""
        opens, self._own_opens = self._own_opens, {}
        return opens

    def release_all(self) -> None:
        for held in self._held.values():
            for fd in held.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._held.clear()
