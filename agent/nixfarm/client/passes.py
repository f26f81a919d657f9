"""How many of this client's builds wait for a machine: the passes of Nix's build hook.

For every build it is asked about, Nix's build hook opens `main-lock` and
then the slot lock files of every machine the build could go to, slot 0
first, in the store's `current-load` directory (src/build-remote/build-remote.cc),
whether it then finds a free slot or not. A build it postpones is asked about
again at every `build-poll-interval`, all waiting builds in one burst. So the
opens of a builder's slot-0 file, grouped into bursts, less the builds that
took a slot meanwhile, are the builds waiting for it: this client's demand
there, which the dispatcher tells the builder (demand.py).

The opens come from inotify, which only watches: nothing here opens or
locks a file Nix uses. Each slot-0 file (both lock namings, slots.py) and
`main-lock` get a watch of their own, not the directory: a pass opens every
slot of every machine, and a farm of wide lines would flood a directory
watch. `main-lock` is there because inotify merges an event into the one
before it when they are the same and unread, which two passes over a
one-builder farm would otherwise be.
"""

from __future__ import annotations

import os
import select
from collections import deque

from ..common.inotify import IN_IGNORED, IN_OPEN, IN_Q_OVERFLOW, Inotify
from .slots import lock_prefixes

BURST_GAP = 0.25  # seconds between opens that still belong to one burst of passes
KEEP = 4096  # opens remembered per builder


class HookPasses:
    """Counts the passes of Nix's build hook over each builder's slot-0 lock files."""

    def __init__(self, directory: str, window: float) -> None:
        self.directory = directory
        self.window = window  # seconds of passes looked at: at least one round of Nix's questions
        self._inotify = Inotify()
        self._watches: dict[int, str | None] = {}  # wd -> store URI (None: main-lock)
        self._uris: set[str] = set()
        self._slot0: dict[str, str] = {}  # slot-0 file name -> store URI
        self._opens: dict[str, deque[float]] = {}  # store URI -> times of its slot-0 opens
        self._took: deque[float] = deque(maxlen=KEEP)  # when this client's hooks took slots
        self.lost = False  # the kernel dropped events (queue overflow): counts are low
        self.passed_at = -1e9  # when a hook's pass was last seen (an open not this process's)

    def close(self) -> None:
        self._inotify.close()

    def watch(self, store_uris: list[str]) -> None:
        """Watch these builders' slot-0 files (and main-lock); files that are missing are made.

        Nix opens them with O_CREAT itself; an empty file is what it would make.
        Cheap when nothing changed: a watch that exists is not added again.
        """
        wanted = set(store_uris)
        if wanted == self._uris and None in self._watches.values():
            return
        self._add("main-lock", None)
        for uri in wanted:
            for prefix in lock_prefixes(uri):
                self._add(f"{prefix}-0", uri)
                self._slot0[f"{prefix}-0"] = uri
            self._opens.setdefault(uri, deque(maxlen=KEEP))
        self._uris = wanted

    def _add(self, name: str, uri: str | None) -> None:
        path = os.path.join(self.directory, name)
        if not os.path.exists(path):
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._watches[self._inotify.add_watch(path, IN_OPEN)] = uri  # the same wd if watched already

    def pending(self) -> bool:
        """Whether opens are queued that read() has not taken yet (a hook passed)."""
        return bool(select.select([self._inotify.fileno()], [], [], 0)[0])

    def read(self, now: float, own: dict[str, int]) -> None:
        """Take the opens the kernel has queued, as happening `now`.

        `own` is how many times this process itself opened each slot-0 file
        since the last read (SlotHolds.take_own_opens); those are not Nix's.
        """
        skip: dict[str, int] = {}
        for name, n in own.items():  # from the files opened, not every builder's names
            if (uri := self._slot0.get(name)) in self._uris:
                skip[uri] = skip.get(uri, 0) + n
        for wd, mask in self._inotify.read():
            if mask & IN_Q_OVERFLOW:
                self.lost = True
            if mask & IN_IGNORED:
                self._watches.pop(wd, None)
                self._uris = set()  # watch() adds it again
                continue
            uri = self._watches.get(wd)
            if uri is None or not mask & IN_OPEN:
                continue
            if skip.get(uri):
                skip[uri] -= 1
                continue
            self._opens[uri].append(now)
            self.passed_at = now

    def took(self, now: float, slots: int) -> None:
        """This client's hooks took `slots` slots (on any builder) by `now` (slots.py)."""
        self._took.extend([now] * slots)

    def waiting(self, store_uri: str, now: float) -> int:
        """Builds waiting for `store_uri`, as of the bursts of passes in the last window.

        Each burst is one round of Nix asking about its builds; the ones that
        took a slot during it no longer wait. The largest count of the recent
        bursts: a burst of first tries between two rounds is not a smaller
        demand.
        """
        opens = self._opens.get(store_uri)
        if not opens:  # no pass over it remembered: most builders, at every count
            return 0
        for times in (opens, self._took):
            while times and now - times[0] > self.window + BURST_GAP:
                times.popleft()
        bursts: list[tuple[float, float, int]] = []  # (first open, last open, opens)
        for t in opens:
            if now - t > self.window:
                continue
            if bursts and t - bursts[-1][1] <= BURST_GAP:
                first, _, count = bursts[-1]
                bursts[-1] = (first, t, count + 1)
            else:
                bursts.append((t, t, 1))
        return max([0, *(count - _during(self._took, first, last) for first, last, count in bursts)])


def _during(times: deque[float], start: float, end: float) -> int:
    return sum(1 for t in times if start - BURST_GAP <= t <= end + BURST_GAP)
