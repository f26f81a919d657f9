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
import ctypes
import errno
import fcntl
import hashlib
import os
import resource
import tempfile
import time
from functools import cache

DEFAULT_DIR = "/nix/var/nix/current-load"
PROC_LOCKS = "/proc/locks"
# Seconds the lock files' names are trusted before the directory is read again (sooner when a
# lock is held on a file not seen yet: a hook's first use of a slot).
INODES_FOR = 60.0
# Seconds between reads for flocks on files not seen yet: every Nix process flocks files of its
# own (temp roots) on the same filesystem, and a read of thousands of names costs ~0.1 s.
UNKNOWN_RESCAN = 10.0
LINKED = -1  # a held slot whose name links to the held file (SlotHolds)
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


@cache  # every builder's, at every poll of the hooks' locks
def lock_prefixes(store_uri: str) -> tuple[str, str]:
    """The slot lock file names of `store_uri` without "-<slot>": CppNix's, Lix's."""
    escaped = store_uri.replace("/", "_")
    digest = nix_base32(hashlib.sha256(store_uri.encode()).digest())
    return escaped, f"{escaped[:48]}-{digest[:16]}"


_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
if _renameat2 is not None:
    _renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
# What renameat2() says where the kernel, the C library or the filesystem cannot swap names.
NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


def rename_exchange(a: str, b: str) -> None:
    """Swap the files two names name, atomically (renameat2's RENAME_EXCHANGE)."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not in this C library", a)
    if _renameat2(_AT_FDCWD, a.encode(), _AT_FDCWD, b.encode(), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), a, None, b)


def raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one: a dispatcher has one per SSH
    connection, and one per builder and naming whose slot 0 it holds (SlotHolds), so
    a farm of some hundreds of builders can pass systemd's default soft limit, 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def flocked_inodes(path: str = PROC_LOCKS, device: bytes | None = None) -> set[int]:
    """The inode numbers of every file someone holds a flock on now (on `device` only, if
    given: its MAJOR:MINOR as /proc/locks writes it, SlotHolds.device()).

    A line is `N: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF`;
    one that waits for a lock has `->` after `N:`. The device is left out
    unless given: /proc/locks names the filesystem's, which on btrfs is not
    the one stat() reports (each subvolume has its own), and another file
    with the same inode number holding a flock at the same time is a rare,
    harmless mistake (one build counted too many for an interval).
    """
    held = set()
    # One large read: the kernel builds /proc/locks anew for every read() call (and waits
    # for an RCU grace period each time), so reading it line by line costs much more.
    with open(path, "rb", buffering=0) as f:
        chunks = []
        while chunk := f.read(1 << 20):
            chunks.append(chunk)
    for line in b"".join(chunks).splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] != b"FLOCK":
            continue
        dev, _, inode = fields[5].rpartition(b":")
        if device is None or dev == device:
            with contextlib.suppress(ValueError):
                held.add(int(inode))
    return held


class SlotHolds:
    """The slot locks this process holds, per lock file prefix.

    A flock belongs to a file (an inode), not to a name, so one locked file
    can hold any number of slots: each held slot's name is made a hard link
    to `held_file`, which this process keeps locked with one descriptor. A
    hook that opens the name finds it locked, as if each had its own. The
    name is switched over atomically (a rename, or a swap of two names) while
    the old file's lock is taken, so a hook never finds the slot free in
    between; letting go puts the slot's own file back, unlocked. So a
    dispatcher holds thousands of slots (300 builders of 64) with a few open
    files, not one per slot and naming.

    Slot 0 keeps a file of its own (an open descriptor, held only when a
    builder gets nothing from this client): the hook's passes are counted by
    watching each builder's slot-0 file (passes.py), which must stay that
    builder's own.
    """

    HELD_NAME = "nixfarm-held"  # never a Nix name: those end in -<slot>, or are main-lock

    def __init__(self, directory: str = DEFAULT_DIR, names: str = "both") -> None:
        self.directory = directory
        # Which of lock_prefixes() the client's Nix uses: "nix" (CppNix), "lix", or "both".
        self._namings = {"nix": (0,), "lix": (1,), "both": (0, 1)}[names]
        self._held: dict[str, dict[int, int]] = {}  # prefix -> slot -> fd (slot 0) or LINKED
        self._held_fd: int | None = None
        self._held_inode = 0
        self._retired: list[int] = []  # the old files of slots switched over, closed at the next hold
        self._locked: dict[int, int] = {}  # fd -> inode of every file this process holds a flock on
        self._names: dict[int, list[str]] = {}  # inode -> lock file names, from the last scan
        self._scanned = -INODES_FOR
        self._not_ours: set[int] = set()  # flocked inodes no scan found here (other files)
        self._index: tuple[set[int], dict[str, list[tuple[int, str]]]] | None = None
        self._own_opens: dict[str, int] = {}  # lock file name -> opens since take_own_opens()
        self._link_cleared = False
        self._device: bytes | None = None
        # Spare links to the held file, one per slot let go, kept under the slot's stash name: a
        # slot is then taken and let go by swapping two names (_switch_over), where the filesystem can.
        self._exchange = True
        self._spares: set[str] = set()

    def taken_by_nix(self, store_uri: str, slots: int, flocked: set[int]) -> frozenset[str]:
        """The lock files of slots 0..slots-1 of `store_uri` that someone else holds:
        Nix's hooks, for this client's builds in flight there. `flocked` is
        flocked_inodes(), read once for all builders."""
        index = self._locked_names(flocked)
        taken = set()
        for prefix in self._prefixes(store_uri):
            held = self._held.get(prefix, {})
            for slot, name in index.get(prefix, ()):
                if slot < slots and slot not in held:
                    taken.add(name)
        return frozenset(taken)

    def _locked_names(self, flocked: set[int]) -> dict[str, list[tuple[int, str]]]:
        """prefix -> (slot, name) of the lock files someone holds a flock on now, from the
        names of the directory (scanned every INODES_FOR s, or when a locked inode is new):
        the cost goes with the locks held, not with the slots of every builder."""
        if self._index is not None and self._index[0] is flocked:
            return self._index[1]
        now = time.monotonic()
        unknown = flocked - self._names.keys() - self._not_ours - self.own_inodes()
        if now - self._scanned > INODES_FOR or (unknown and now - self._scanned > UNKNOWN_RESCAN):
            self._scan(now)
            self._not_ours = flocked - self._names.keys()
        index: dict[str, list[tuple[int, str]]] = {}
        for inode in flocked:
            if inode == self._held_inode:
                continue
            for name in self._names.get(inode, ()):
                prefix, _, slot = name.rpartition("-")
                index.setdefault(prefix, []).append((int(slot), name))
        self._index = (flocked, index)
        return index

    def _scan(self, now: float) -> None:
        names: dict[int, list[str]] = {}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.rpartition("-")[2].isdigit() and not entry.name.startswith("."):
                    names.setdefault(entry.inode(), []).append(entry.name)
        self._names, self._scanned = names, now

    def hold(self, store_uri: str, slots: int, count: int) -> int:
        """Hold `count` of the slots 0..slots-1 of `store_uri` (the highest ones: Nix
        takes the lowest free one), releasing the rest. Slots that Nix holds for
        running builds cannot be taken; returns how many this process holds (the
        smallest over both namings)."""
        for fd in self._retired:
            self._close(fd)
        self._retired = []
        return min(self._hold(prefix, slots, count) for prefix in self._prefixes(store_uri))

    def _prefixes(self, store_uri: str) -> list[str]:
        both = lock_prefixes(store_uri)
        return [both[i] for i in self._namings]

    def _hold(self, prefix: str, slots: int, count: int) -> int:
        held = self._held.setdefault(prefix, {})
        count = max(0, min(count, slots))
        if len(held) == count and (not held or max(held) < slots):
            return count  # as it is: the common case, every pass over every builder
        # Let go of slots beyond the capacity, then of the lowest ones (Nix tries those first).
        beyond = [slot for slot in held if slot >= slots]
        lowest = sorted(slot for slot in held if slot < slots)[: max(0, len(held) - len(beyond) - count)]
        for slot in beyond + lowest:
            self._let_go(f"{prefix}-{slot}", held.pop(slot))
        for slot in range(slots - 1, -1, -1):
            if len(held) >= count:
                break
            if slot not in held and (fd := self._try_lock(f"{prefix}-{slot}", slot)) is not None:
                held[slot] = fd
        return len(held)

    def _try_lock(self, name: str, slot: int) -> int | None:
        # As Nix opens it (O_CREAT, 0600); flock, as Nix's lockFile() does.
        path = f"{self.directory}/{name}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._own_opens[name] = self._own_opens.get(name, 0) + 1  # not a pass of Nix's hook (passes.py)
        st = os.fstat(fd)
        if st.st_ino == self._held_inode and slot != 0:
            os.close(fd)
            return LINKED  # linked to ours already
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        self._locked[fd] = st.st_ino
        self._names.setdefault(st.st_ino, [name])  # the slot's own file, which a hook may lock later
        if slot == 0:
            return fd
        try:
            self._switch_over(path, self._stash_name(name))
        except OSError as e:
            self._close(fd)
            self._link_cleared = False  # a link may be left under the temporary name
            if e.errno == errno.EMLINK:  # the held file has all the links it may have
                return self._try_lock(name, 0) if slot else None
            raise
        if st.st_nlink > 1:
            # The held file of a dispatcher that died, which its other links still name:
            # kept locked, it would hold those too; put back, it would be one file for all.
            self._close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._stash_name(name))
        else:
            self._retired.append(fd)
        return LINKED

    def _switch_over(self, path: str, stash: str) -> None:
        """Make `path` a link to the held file, its own file (locked by us) kept as `stash`.

        While we hold the old file, the name becomes a link to the held file: a
        hook that opened the old one finds it locked until the next hold() (its
        open and flock are microseconds apart), one that opens the name after
        finds ours. The old file is kept under a name of ours, to be put back
        when the slot is let go: creating files in a directory of thousands of
        links cost ~0.5 ms each (ext4). Where the filesystem can, `stash` is a
        spare link to the held file and the two names are swapped: one
        directory operation instead of three (a link of each file and a
        rename): a hold change took 42 us of CPU, 23 us now (bench/README.md).
        """
        if self._exchange:
            if stash not in self._spares:
                self._make_spare(stash)
            try:
                rename_exchange(stash, path)
                self._spares.discard(stash)
                return
            except OSError as e:
                if e.errno not in NO_EXCHANGE:
                    raise
                self._exchange = False  # the spares left are stashes a link below replaces
                self._spares.clear()
        link = self._link_name()
        try:
            os.link(path, stash)
        except FileExistsError:  # left by a dispatcher that died
            os.unlink(stash)
            os.link(path, stash)
        os.link(self._held_file(), link)
        os.rename(link, path)

    def _make_spare(self, stash: str) -> None:
        """A spare link to the held file as `stash` (over one a dispatcher that died left)."""
        link = self._link_name()
        try:
            os.link(self._held_file(), link)
        except OSError as e:
            if e.errno != errno.EMLINK or not self._spares:
                raise
            # The spares only save time: the held file's links are for held slots first.
            self._drop_spares()
            os.link(self._held_file(), link)
        os.rename(link, stash)
        self._spares.add(stash)

    def _drop_spares(self) -> None:
        for stash in self._spares:
            with contextlib.suppress(OSError):
                os.unlink(stash)
        self._spares.clear()

    def _held_file(self) -> str:
        """The file every linked slot names, locked by this process (made anew by each process:
        the links a dispatcher that died left behind name a file nobody locks, free slots)."""
        path = os.path.join(self.directory, self.HELD_NAME)
        if self._held_fd is None:
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".nixfarm-held-")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(tmp, path)
            except OSError:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._held_fd, self._held_inode = fd, os.fstat(fd).st_ino
        return path

    def _let_go(self, name: str, fd: int) -> None:
        if fd != LINKED:
            self._close(fd)  # closing the file drops its flock
            return
        path, stash = f"{self.directory}/{name}", self._stash_name(name)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == self._held_inode:
                try:
                    # The slot's own file, unlocked, back; the link to the held file kept as a spare.
                    if self._exchange:
                        rename_exchange(stash, path)
                        self._spares.add(stash)
                    else:
                        os.rename(stash, path)
                except FileNotFoundError:
                    os.unlink(path)  # Nix's next open makes a fresh, unlocked file

    def _stash_name(self, name: str) -> str:
        return f"{self.directory}/.nixfarm-own-{name}"  # never a Nix name (a dot)

    def _link_name(self) -> str:
        """A temporary name for a new link (always renamed away; one a dead process left is not)."""
        path = f"{self.directory}/.nixfarm-link-{os.getpid()}"
        if not self._link_cleared:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._link_cleared = True
        return path

    def _close(self, fd: int) -> None:
        self._locked.pop(fd, None)
        os.close(fd)

    def device(self) -> bytes | None:
        """The MAJOR:MINOR /proc/locks writes for the files here (learnt from the held file's
        lock, once it is taken), or None while it is not known."""
        if self._device is None and self._held_fd is not None:
            with contextlib.suppress(OSError), open(PROC_LOCKS, "rb", buffering=0) as f:
                for line in f.read(1 << 22).splitlines():
                    fields = line.split()
                    if len(fields) >= 6 and fields[5].endswith(b":%d" % self._held_inode):
                        self._device = fields[5].rpartition(b":")[0]
        return self._device

    def own_inodes(self) -> set[int]:
        """The inodes of the files this process holds a flock on (in /proc/locks, not Nix's)."""
        return {self._held_inode, *self._locked.values()}

    def take_own_opens(self) -> dict[str, int]:
        """How often this process opened each lock file since the last call."""
        opens, self._own_opens = self._own_opens, {}
        return opens

    def open_files(self) -> int:
        """The descriptors the holds take now (the held file, slot-0 files, old files to close)."""
        own = sum(1 for held in self._held.values() for fd in held.values() if fd != LINKED)
        return own + len(self._retired) + (self._held_fd is not None)

    def release_all(self) -> None:
        for prefix, held in self._held.items():
            for slot, fd in held.items():
                with contextlib.suppress(OSError):
                    self._let_go(f"{prefix}-{slot}", fd)
        self._drop_spares()
        for fd in [*self._retired, *([self._held_fd] if self._held_fd is not None else [])]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._held.clear()
        self._retired, self._held_fd, self._held_inode, self._locked = [], None, 0, {}
