"""Builds waiting for a machine, per client, as the clients' dispatchers tell a builder.

A dispatcher counts its client's builds that wait for a machine (passes.py)
and sends the count for each builder down that builder's stream session, as
a line `demand N`. The stream runs as the builder user under the gateway,
which names the client (never the client itself), and keeps the count in
`state_dir/demand/<client>.json`, refreshed every interval. Every snapshot
reports the fresh ones as `builds.demand_by_client`: a dispatcher then
shares a builder's free slots among the clients that still have builds to
send, not among every client that has a build running there.

The directory belongs to the agent service (root), group `control_group`,
mode 0770; where there is none (no agent, or no control group) streams keep
nothing and snapshots have no demand, and dispatchers go by sessions alone.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import time

from ..common.atomic import write_atomic
from ..common.snapshot import MAX_WAITING, is_count

DIRECTORY = "demand"
FRESH_FOR = 10.0  # seconds a count is believed without a refresh (a stream refreshes every interval)
MAX_CLIENTS = 256  # files read per snapshot
MAX_FILE = 256  # bytes read per file
MAX_LINE = 64  # a stream ignores longer input lines


def demand_dir(state_dir: str) -> str:
    return os.path.join(state_dir, DIRECTORY)


class Lines:
    """A stream's stdin as `demand N` counts: input is untrusted and bounded.

    Lines over MAX_LINE bytes, and anything but `demand N`, are dropped.
    """

    def __init__(self) -> None:
        self._partial = b""
        self._discarding = False  # inside a line too long to be ours, until its newline

    def feed(self, data: bytes) -> list[int]:
        """The counts of the whole lines `data` completes."""
        *lines, self._partial = (self._partial + data).split(b"\n")
        if self._discarding and lines:
            lines, self._discarding = lines[1:], False  # the rest of a line too long to be ours
        if len(self._partial) > MAX_LINE:
            self._partial, self._discarding = b"", True
        counts = (parse_line(line) if len(line) <= MAX_LINE else None for line in lines)
        return [count for count in counts if count is not None]


def parse_line(line: bytes) -> int | None:
    """The count of a `demand N` line, or None if it is anything else."""
    words = line.split()
    if len(words) != 2 or words[0] != b"demand" or not words[1].isdigit() or len(words[1]) > 7:
        return None
    count = int(words[1])
    return count if count <= MAX_WAITING else None


class ClientDemand:
    """One stream's client's count, kept where every stream's snapshots read it."""

    def __init__(self, state_dir: str, client: str) -> None:
        self.path = os.path.join(demand_dir(state_dir), f"{client}.json")
        self.waiting: int | None = None  # None: the client has said nothing yet
        self._written = 0.0
        self.problem = ""  # why the last write failed (the stream warns once; writes are retried)

    def set(self, waiting: int) -> None:
        changed = waiting != self.waiting
        self.waiting = waiting
        if changed:
            self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        """Rewrite the record so that readers know it is current (at most once a second)."""
        if self.waiting is None or (not force and time.time() - self._written < 1.0):
            return
        self._written = time.time()
        record = json.dumps({"waiting": self.waiting, "time": self._written}).encode()
        try:
            # Not durable: a count a few seconds old is worth nothing after a crash.
            write_atomic(self.path, record, mode=0o640, durable=False)
            self.problem = ""
        except OSError as e:
            self.problem = f"cannot keep the client's demand in {os.path.dirname(self.path)}: {e.strerror}"

    def remove(self) -> None:
        if self.waiting is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def read_demand(state_dir: str, now: float | None = None) -> dict[str, int] | None:
    """Fresh counts per client; None where no agent keeps a demand directory."""
    now = time.time() if now is None else now
    try:
        names = sorted(os.listdir(demand_dir(state_dir)))
    except OSError:
        return None
    counts = {}
    for name in names[:MAX_CLIENTS]:
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            with open(os.path.join(demand_dir(state_dir), name), "rb") as f:
                record = json.loads(f.read(MAX_FILE))
            waiting, written = record["waiting"], float(record["time"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if is_count(waiting) and 0 <= now - written <= FRESH_FOR:
            counts[name[: -len(".json")]] = waiting
    return counts


def prepare_dir(path: str, group: str) -> None:
    """Make a directory the builder user (in `group`) writes records in: demand
    counts (streams), sessions (the gateway, sessions.py).

    Without a control group only root could write there: the directory is
    not made, and nothing is kept.
    """
    if not group:
        return
    gid = grp.getgrnam(group).gr_gid
    os.makedirs(path, exist_ok=True)
    os.chown(path, 0, gid)
    # Not setgid (the agent's unit has RestrictSUIDSGID=): every stream runs as the
    # builder user, so the records it writes are its own to read. No access for others.
    os.chmod(path, 0o770)  # noqa: S103 - group-writable on purpose: the streams write here
