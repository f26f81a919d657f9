"""Hold back builder slots in Nix's own load accounting.

Nix's build hook counts a machine's load by trying to lock one file per slot
(`maxJobs` of them) under the store's `current-load` directory; a slot whose
lock it cannot take is busy. It does this for every build it is asked about,
while it reads the machines file only once per hook process, and keeps that
list for as long as it answers "postpone" (src/build-remote/build-remote.cc).
So the dispatcher lists each builder with its full capacity and holds the
locks of the slots this client must leave to others: every request sees the
current allowance, also in a hook that started long ago.

The lock file names are Nix's: `<uri with / as _>-<slot>` (CppNix 2.x), and
Lix's `<first 48 chars of that>-<16 chars of the URI's sha256, Nix base32>-<slot>`.
Both are held; the one the running Nix does not use costs an open file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import resource

DEFAULT_DIR = "/nix/var/nix/current-load"
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


class SlotHolds:
    """The slot locks this process holds, per lock file prefix."""

    def __init__(self, directory: str = DEFAULT_DIR) -> None:
        self.directory = directory
        self._held: dict[str, dict[int, int]] = {}  # prefix -> slot -> fd

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
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def release_all(self) -> None:
        for held in self._held.values():
            for fd in held.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._held.clear()
