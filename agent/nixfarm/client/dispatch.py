"""`nixfarm dispatch`: keep Nix's machines file true to every builder's real load.

One long-lived SSH session per builder runs `nixfarm stream` through the
gateway, with the client's key and the builder's pinned host key (strict
checking, as nix-daemon does). From each stream the dispatcher keeps a state:

  healthy   fresh snapshots: listed; what this client may send it follows
            the load of all clients, and the rest of its line is held in
            Nix's own load accounting (slots.py)
  degraded  reachable, but its metrics cannot be trusted (garbage, a wrong
            schema, a stalled stream): offers the inventory's static
            max_jobs, as stock Nix would
  down      unreachable, or its store is below min-free and not recovering:
            left out of the file

Every line is as wide as the biggest builder, so Nix's hook sends each
build where this client may still send the most. Beside the streams, the
dispatcher reads its own client's hooks every HOOK_POLL s: the slot locks
they hold (its builds in flight, from /proc/locks) and their passes over
the lock files (its builds waiting for a machine, passes.py), which it
tells each builder down the stream (demand.py).

Failures are retried with exponential backoff and jitter (Hydra-style). The
machines file is rewritten only when its content changes, atomically, and is
always a file Nix accepts; the inventory's static lines go back when the
dispatcher stops. docs/client.md ("The dispatcher") explains the formula.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from typing import Any

import asyncssh

from ..common.atomic import write_atomic
from ..common.inotify import InotifyUnavailable
from ..common.snapshot import MAX_LINE, BadSnapshot, validate
from .inventory import Builder, Inventory
from .loop import batching_loop
from .passes import HookPasses
from .slots import PROC_LOCKS, SlotHolds, flocked_inodes
from .sshconn import connect_options, run_for_line

# How often the hooks' slot locks are read: a hook that took a slot connects to the
# builder (100-300 ms) before Nix asks about its next build.
HOOK_POLL = 0.05
ACCOUNTS_EVERY = 60.0  # seconds between asking each builder for its accounts (usage)
ACCOUNTS_TIMEOUT = 30.0
STOP_WITHIN = 5.0  # seconds the SSH sessions get to close when the dispatcher stops
LOCKS_EVERY = 1.0  # seconds between reads of the hooks' slot locks while no hook passes
BUSY_FOR = 1.0  # seconds the locks are read at every poll after a hook passed
COUNT_EVERY = 0.25  # seconds between counts of the waiting builds when no hook passed (passes.py)
STATUS_EVERY = 1.0  # seconds between status writes while only the load changes
# The streams' ciphers: AES-GCM before ChaCha20-Poly1305 (asyncssh's and OpenSSH's first
# choice), as every OpenSSH server offers them. With the AES instructions of the clients'
# x86_64 and aarch64 CPUs, asyncssh decrypts a packet several times faster with it (one call
# into OpenSSL, where ChaCha20 takes three): 150 snapshots a second come from 300 builders.
STREAM_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                  "aes256-ctr", "aes192-ctr", "aes128-ctr")  # fmt: skip

log = logging.getLogger("nixfarm.dispatch")


class Settings:
    """Timing of the dispatcher (seconds), from its command line."""

    def __init__(
        self,
        interval: float = 2.0,
        keepalive: float = 5.0,
        keepalive_count: int = 3,
        backoff_base: float = 60.0,
        backoff_factor: float = 3.0,
        backoff_max: float = 1800.0,
        disk_grace: float | None = None,
        build_poll_interval: float = 1.0,
    ) -> None:
        self.interval = interval
        # The client Nix's build-poll-interval: how often it asks again for a postponed build.
        self.build_poll_interval = build_poll_interval
        self.keepalive = keepalive
        self.keepalive_count = keepalive_count
        self.backoff_base = backoff_base
        self.backoff_factor = backoff_factor
        self.backoff_max = backoff_max
        # How long a store may stay below min-free before the builder leaves the file.
        self.disk_grace = 3 * interval if disk_grace is None else disk_grace

    @property
    def reaction(self) -> float:
        """The longest a slot freed on a builder can wait for this client's next build.

        The dispatcher sees the slot free at the next snapshot, and the
        client's Nix asks again at its next poll of postponed builds.
        """
        return self.interval + self.build_poll_interval

    @property
    def stall_timeout(self) -> float:
        """No snapshot for this long: the stream is stalled (or the link is gone)."""
        return 2 * self.interval

    def backoff(self, failures: int) -> float:
        """Delay before attempt number `failures + 1`, with +-20% jitter."""
        delay = min(self.backoff_base * self.backoff_factor ** max(0, failures - 1), self.backoff_max)
        return delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not security


class StreamEnded(OSError):
    """The builder ended the stream (its end of the session closed)."""


class SnapshotSession(asyncssh.SSHClientSession[bytes]):
    """A `nixfarm stream` session: its output is handed to `take` as it arrives, a chunk's
    whole lines at a time, in the connection's own callback. 150 snapshots a second come
    from 300 builders; a reader task woken for each (asyncssh's process streams) cost more
    than the snapshot itself. `ended` completes when the session does: with StreamEnded
    (what the stream said last on stderr), BadSnapshot, or the connection's error."""

    def __init__(self, take: Callable[[list[bytes]], None]) -> None:
        self._take = take
        self._partial = b""
        self._stderr = b""
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self.ended.done():
            return
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self._stderr = (self._stderr + data)[-4096:]
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        try:
            if len(self._partial) > MAX_LINE:
                raise BadSnapshot(f"a line longer than {MAX_LINE} bytes")
            self._take(lines)
        except BadSnapshot as e:
            self.ended.set_exception(e)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ended.done():
            return
        if exc is not None:
            self.ended.set_exception(exc)
            return
        err = self._stderr.decode(errors="replace").strip()
        self.ended.set_exception(StreamEnded(f"stream ended{': ' + err.splitlines()[-1] if err else ''}"))


def ending_soon(snap: dict[str, Any], within: float) -> int:
    """How many of a builder's running builds will likely end within `within` seconds.

    As many as ended there in the last `within` seconds: its slots turn over
    at that pace now (Little's law). It is the pace of the builds running
    now, not a guess from what builds took before: a builder busy with long
    builds has no recent ends, however short its earlier builds were, so
    nothing is sent to wait behind them (bench/README.md, long_first). At
    most the builds running there now, and at most its capacity.
    """
    finished = snap["builds"].get("finished", [])
    ended = sum(1 for ago, _ in finished if ago <= within)
    return min(ended, snap["builds"]["active"], snap["nix_config"]["max_jobs"])


def share(snap: dict[str, Any], me: str, reaction: float = 0.0, unseen: int = 0) -> int:
    """How many builds this client may send a healthy builder beyond those it has there.

    capacity = the builder's max-jobs; active = builds there from all
    clients; unseen = builds this client sent that the snapshot does not
    show yet (a hook was still connecting). A builder may hold, beyond its
    capacity, as many builds as slots will likely free within one
    `reaction` of the clients (ending_soon): they wait there and start the
    moment a slot frees, where a build waiting on its client starts only at
    the client's next poll. A builder busy with long builds gets none, so
    nothing parks behind them. free = capacity + that many - active -
    unseen, shared among the clients that want it (competing()) and this
    one. If the share rounds to zero but slots are free, each
    competitor may take one: at most (competitors - 1) builds too many,
    seen and corrected at the next snapshot, one interval later.
    """
    capacity = snap["nix_config"]["max_jobs"]
    active = snap["builds"]["active"]
    free = max(0, capacity + ending_soon(snap, reaction) - active - unseen)
    competitors = 1 + len(competing(snap) - {me})
    return free // competitors or (1 if free else 0)


def competing(snap: dict[str, Any]) -> set[str]:
    """The clients that want a builder's free slots: those with builds waiting for a
    machine, as their dispatchers told it (builds.demand_by_client), and those it has
    no word from with a build session there (an older dispatcher, or none)."""
    sessions = snap["builds"].get("sessions_by_client", {})
    demand = snap["builds"].get("demand_by_client", {})
    waiting = {client for client, n in demand.items() if n > 0}
    return waiting | {client for client, n in sessions.items() if n > 0 and client not in demand}


def claim(snap: dict[str, Any], me: str, reaction: float = 0.0) -> int:
    """How many builds this client may have on a healthy builder, from the snapshot alone:
    what it has there (its build sessions) plus its share, at most the capacity.

    The allowance may be 0: it is enforced by held slot locks, which Nix's
    hook checks for every build, not by the machines file, which a waiting
    hook reads only once (a 0 there starved clients: bench/README.md).
    """
    mine = snap["builds"].get("sessions_by_client", {}).get(me, 0)
    return min(snap["nix_config"]["max_jobs"], mine + share(snap, me, reaction))


def min_free_of(snap: dict[str, Any]) -> int:
    """The free space below which a builder is in trouble (its GC's or Nix's min-free)."""
    gc = snap.get("gc") or {}
    for value in (gc.get("min_free_bytes"), snap["nix_config"].get("min_free_bytes")):
        if isinstance(value, int) and value > 0:
            return value
    return snap["store"]["total_bytes"] // 100  # no min-free anywhere: 1% of the store


class BuilderState:
    """What the dispatcher knows of one builder."""

    def __init__(self, builder: Builder, reaction: float) -> None:
        self.builder = builder
        self.reaction = reaction  # Settings.reaction: how far ahead claim() looks
        self.state = "down"
        self.reason = "not connected yet"
        self.snapshot: dict[str, Any] | None = None
        self.snapshot_line: bytes | None = None  # its JSON text as it came (status_json())
        self.last_seen: float | None = None
        self.failures = 0
        self.retry_at = 0.0
        self.low_disk_since: float | None = None
        self.stalled = False  # degraded because the stream stalled: not listed
        # Its per-client accounts, all time (nixfarm accounts), for `nixfarm usage` by any user.
        self.accounts: dict[str, Any] | None = None
        # This client's builds in flight there, from its hooks' slot locks (None: not known).
        self.in_flight: int | None = None
        self.in_flight_at_snapshot = 0  # when the last snapshot came
        self.sent_since_snapshot = 0  # builds its hooks took a slot for since then
        self._taken: frozenset[str] = frozenset()
        # This client's builds waiting for a machine that could be this one (passes.py), and
        # what its stream was last told of them (demand.py); None: not known, not told.
        self.waiting: int | None = None
        self._waited_at = 0.0  # when a build last waited for it
        self.told: int | None = None
        self.stream_input: asyncssh.SSHClientChannel[bytes] | None = None
        self.held_for: tuple[object, ...] | None = None  # what its slots were last held for (hold_slots)
        self.snapshots = 0  # how many came
        self.heard: float | None = None  # monotonic time its stream last sent anything; None: no stream
        self.connection: asyncssh.SSHClientConnection | None = None  # the stream's
        self._allowed: tuple[tuple[object, ...], int] | None = None  # allowance() and what it came from
        self._entry: tuple[tuple[object, ...], bytes] | None = None  # status_json() and what it came from
        # As the dispatcher last saw it (Dispatcher.changed): its line's inputs, its status.
        self.seen_layout: tuple[bool, int] | None = None
        self.seen_status: tuple[object, ...] | None = None

    def healthy(self, snap: dict[str, Any], now: float, grace: float, line: bytes | None = None) -> None:
        """A snapshot came (`line`: its JSON as it came, validate()d, for the status)."""
        self.snapshot, self.snapshot_line, self.last_seen, self.failures = snap, line, now, 0
        self.snapshots += 1
        self.stalled = False
        # A new snapshot, a new budget (allowance()).
        self.in_flight_at_snapshot, self.sent_since_snapshot = self.in_flight or 0, 0
        free, floor = snap["store"]["free_bytes"], min_free_of(snap)
        if free >= floor:
            self.low_disk_since = None
            self.state, self.reason = "healthy", ""
            return
        self.low_disk_since = self.low_disk_since or now
        if now - self.low_disk_since >= grace:
            self.state = "down"
            below = now - self.low_disk_since
            self.reason = (
                f"disk critical: {free >> 20} MiB free, below min-free {floor >> 20} MiB for {below:.0f} s"
            )
        else:
            self.state, self.reason = "healthy", f"low disk: {free >> 20} MiB free, GC should catch up"

    def saw_hooks(self, taken: frozenset[str] | None) -> tuple[bool, int]:
        """Record the slot locks this client's hooks hold there now: (changed, slots newly taken)."""
        new = 0
        if taken is None:
            changed, self.in_flight = self.in_flight is not None, None
        else:
            new = len(taken - self._taken)
            self.sent_since_snapshot += new
            changed, self.in_flight = taken != self._taken, len(taken)
        self._taken = taken or frozenset()
        return changed, new

    def saw_waiting(self, count: int, now: float) -> None:
        """Take the count of this client's builds waiting for this builder (passes.py).

        A fall to none is told only after it has lasted one reaction: the
        builds that just took their slots are not in the builders' snapshots
        yet, and a client that stopped competing at once would let the others
        share the slots those builds are about to fill.
        """
        if count > 0 or self.waiting is None:
            self.waiting, self._waited_at = count, now
        elif now - self._waited_at >= self.reaction:
            self.waiting = 0

    def tell_demand(self) -> None:
        """Tell the builder's stream how many of this client's builds wait for it, if that changed."""
        if self.stream_input is None or self.waiting is None or self.waiting == self.told:
            return
        with contextlib.suppress(OSError, asyncssh.Error):
            self.stream_input.write(f"demand {self.waiting}\n".encode())
        self.told = self.waiting

    def failed(self, state: str, reason: str, settings: Settings) -> float:
        """Record a failure; returns seconds until the next attempt."""
        self.failures += 1
        self.stalled = False
        delay = settings.backoff(self.failures)
        self.state, self.reason = state, reason
        self.retry_at = time.monotonic() + delay
        return delay

    def listed(self) -> bool:
        return self.state != "down" and not self.stalled

    def capacity(self) -> int:
        """Its max-jobs as last seen, else the inventory's."""
        if self.snapshot is not None:
            return int(self.snapshot["nix_config"]["max_jobs"])
        return self.builder.max_jobs

    def allowance_inputs(self) -> tuple[object, ...]:
        """All allowance() depends on (besides the client's name, which never changes): with
        hundreds of builders it is asked for often, and each one's changes only per snapshot."""
        return (self.snapshots, self.state, self.stalled, self.in_flight,
                self.in_flight_at_snapshot, self.sent_since_snapshot)  # fmt: skip

    def allowance(self, me: str) -> int:
        """allowance_now(), worked out again only when its inputs changed."""
        inputs = self.allowance_inputs()
        if self._allowed is None or self._allowed[0] != inputs:
            self._allowed = (inputs, self.allowance_now(me))
        return self._allowed[1]

    def allowance_now(self, me: str) -> int:
        """How many builds this client's Nix may have on it now (the rest of its line is held).

        Healthy: what its hooks have there now plus what is left of its
        share since the last snapshot (claim() where the hooks' locks cannot
        be read). Degraded (or not seen yet): the inventory's max_jobs, as a
        static file would offer it. Left out: none, so that a hook that read
        the file before it left passes it by.
        """
        if not self.listed():
            return 0
        if self.state == "degraded" or self.snapshot is None:
            return self.builder.max_jobs
        if self.in_flight is None:
            return claim(self.snapshot, me, self.reaction)
        # A budget per snapshot: the share, less what the hooks took since. A build of
        # this client that ends frees its lock, but not a new share: the slot it leaves
        # is the builder's to give at the next snapshot, to whoever's share it falls in
        # (often a build already waiting there), or this client would send a
        # replacement behind it every time.
        mine = self.snapshot["builds"].get("sessions_by_client", {}).get(me, 0)
        unseen = max(0, self.in_flight_at_snapshot - mine)
        budget = share(self.snapshot, me, self.reaction, unseen) - self.sent_since_snapshot
        capacity = self.capacity()
        return self.in_flight + max(0, min(budget, capacity - self.in_flight))

    def machines_line(self, inventory: Inventory, width: int) -> str | None:
        """The line Nix sees for this builder now, or None when it is left out.

        Every listed builder has the same maxJobs (`width`, Dispatcher.width())
        and speedFactor: Nix then sends a build where this client may still
        send the most.
        """
        if not self.listed():
            return None
        return self.builder.machines_line(inventory.key_file, width, 1)

    def status(self, inventory: Inventory, width: int) -> dict[str, Any]:
        snap = self.snapshot or {}
        return {
            "name": self.builder.name,
            "state": self.state,
            "reason": self.reason,
            "last_seen": self.last_seen,
            "failures": self.failures,
            "line": self.machines_line(inventory, width),
            # Of its capacity, the slots left to other clients now (all of them when left out).
            "held_back": max(0, self.capacity() - self.allowance(inventory.client_name)),
            "in_flight": self.in_flight,
            "waiting": self.waiting,  # this client's builds waiting for a machine like it
            # Builds it may take beyond its capacity now (claim()); only a healthy builder takes any.
            "ahead": ending_soon(snap, self.reaction) if self.state == "healthy" and snap else 0,
            "snapshot": snap,
            "accounts": self.accounts,
        }

    def status_json(self, inventory: Inventory, width: int) -> bytes:
        """status() as JSON, with the snapshot's text as it came: encoding every builder's
        snapshot again was most of the cost of a status write. Kept until status()'s inputs
        change: a status write takes every builder's, and each changes about once a snapshot."""
        accounts_time = self.accounts["time"] if self.accounts else None
        inputs = (self.allowance_inputs(), self.reason, self.failures, self.waiting, accounts_time, width)
        if self._entry is None or self._entry[0] != inputs:
            self._entry = (inputs, self._encode_status(inventory, width))
        return self._entry[1]

    def _encode_status(self, inventory: Inventory, width: int) -> bytes:
        entry = self.status(inventory, width)
        if self.snapshot_line is None:
            return json.dumps(entry).encode()
        del entry["snapshot"]
        return json.dumps(entry).encode()[:-1] + b', "snapshot": ' + self.snapshot_line + b"}"


class Dispatcher:
    """Runs one follower task per builder and rewrites the machines file."""

    def __init__(
        self,
        inventory: Inventory,
        machines_path: str,
        settings: Settings,
        status_path: str,
        holds: SlotHolds,
    ) -> None:
        self.inventory = inventory
        self.holds = holds
        self.machines_path = machines_path
        self.status_path = status_path
        self.settings = settings
        self.states = {b.name: BuilderState(b, settings.reaction) for b in inventory.builders}
        self._written: str | None = None
        self._usable: tuple[str, ...] | None = None
        self._hold_problem = ""  # the last slot-holding failure logged (each once)
        self._status_news = True  # a builder's state changed since the status was written
        self._status_at = 0.0
        self._status_due = False  # a change not written to the status yet
        self._changed = asyncio.Event()
        # With hundreds of builders, publish() looks only at those that changed since
        # (changed()), and at those whose slots could not be held.
        self._dirty: set[BuilderState] = set(self.states.values())
        self._unheld: set[BuilderState] = set()
        self._held_width = -1  # the width the holds were last taken for
        # The maxJobs of every line; it never shrinks (see width()). It starts at
        # the static lines' widest, which hooks may have read before we wrote.
        self._width = max((b.max_jobs for b in inventory.builders), default=0)
        self._layout = 0  # changes to which builders are listed, or to their capacities
        self._content: tuple[object, str] | None = None  # the machines file's last inputs and content
        self._listed: tuple[int, list[str]] | None = None  # _listed_uris() and the layout it is of

    def width(self) -> int:
        """The maxJobs every listed builder gets: at least the largest capacity.

        Nix's hook counts a builder's load as the slots of its line whose locks
        it cannot take, and sends a build to the builder with the lowest load
        (its speedFactors being equal). With equal widths that is the builder
        where this client may still send the most (allowance minus what it
        runs there); ties go to the earlier line. The width never shrinks: a
        hook that read an older file must still find the slots beyond each
        allowance held, and the holds take the highest slots first, so every
        width up to the current one sees the same allowance.
        """
        return self._width  # raised by changed()

    def line_slots(self, held: bool) -> dict[str, int]:
        """The maxJobs of each builder's line: the width, or, where the slot locks could
        not be taken (`held` false), the builder's own capacity, as a static file would."""
        width = self.width()
        return {name: width if held else s.capacity() for name, s in self.states.items()}

    def machines_content(self, slots: dict[str, int]) -> str:
        """The machines file (`slots`: line_slots()): faster builders first (the inventory's
        speed_factor), then bigger."""
        order = sorted(
            self.states.values(), key=lambda s: (-s.builder.speed_factor, -s.capacity(), s.builder.name)
        )
        lines = [line for s in order if (line := s.machines_line(self.inventory, slots[s.builder.name]))]
        header = f"# written by nixfarm dispatch: {len(lines)} of {len(self.states)} builders usable\n"
        return header + "".join(line + "\n" for line in lines)

    def static_content(self) -> str:
        """The inventory's static lines (what /etc/nix/machines holds), for when no dispatcher runs.

        The dispatcher's own lines are as wide as the biggest builder and rely
        on its held locks; without them every builder would look that big.
        """
        lines = [s.builder.machines_line(self.inventory.key_file, s.builder.max_jobs, s.builder.speed_factor)
                 for s in self.states.values()]  # fmt: skip
        header = "# written by nixfarm dispatch as it stopped: the inventory's static lines\n"
        return header + "".join(line + "\n" for line in lines)

    def publish(self) -> None:
        """Rewrite the machines file if its content changed; always refresh the status."""
        dirty, self._dirty = self._dirty, set()
        held = self.hold_slots(dirty)  # before the file lists more free slots than Nix may take
        inputs = (held, self.width(), self._layout)  # all the content depends on
        if self._content is None or self._content[0] != inputs:
            self._content = (inputs, self.machines_content(self.line_slots(held)))
        content = self._content[1]
        if content != self._written:
            write_atomic(self.machines_path, content.encode())
            self._written = content
            self._log_usable()
        # The status: at once when a builder's state changed, else at most every STATUS_EVERY s
        # (with hundreds of builders it is megabytes of JSON, and the loads change all the time).
        if not self._status_news and time.monotonic() - self._status_at < STATUS_EVERY:
            self._status_due = True
            return
        slots = self.line_slots(held)
        status = {
            "client": self.inventory.client_name,
            "machines_file": self.machines_path,
            "updated": time.time(),
            "interval": self.settings.interval,
            "width": self.width(),
        }
        builders = b", ".join(s.status_json(self.inventory, slots[name]) for name, s in self.states.items())
        data = json.dumps(status).encode()[:-1] + b', "builders": [' + builders + b"]}"
        # Not durable: a status a moment old is worth nothing after a crash.
        write_atomic(self.status_path, data, durable=False)
        self._status_news, self._status_at, self._status_due = False, time.monotonic(), False

    def hold_slots(self, changed: set[BuilderState] | None = None) -> bool:
        """Hold, in Nix's load accounting, every slot of each line beyond this client's allowance
        (of the `changed` builders only, unless the width changed).

        False if some could not be held: the file then offers each builder's
        capacity (machines_content), as a static file would.
        """
        width = self.width()
        if changed is None or width != self._held_width:
            changed, self._held_width = set(self.states.values()), width
        for state in changed | self._unheld:
            # What the allowance depends on: unchanged, the holds are as they should be.
            inputs = (state.allowance_inputs(), width)
            if inputs == state.held_for:
                continue
            allowed = state.allowance(self.inventory.client_name)
            try:
                self.holds.hold(state.builder.store_uri, width, width - allowed)
                state.held_for = inputs
                self._unheld.discard(state)
            except OSError as e:
                state.held_for = None
                self._unheld.add(state)
                problem = f"cannot hold slots of {state.builder.name} in {self.holds.directory}: {e}"
                if problem != self._hold_problem:
                    log.warning("%s; the machines file offers each builder's capacity meanwhile", problem)
                self._hold_problem = problem
        return not self._unheld

    def _log_usable(self) -> None:
        """Log when the set of usable builders changes (not on every load change)."""
        usable = tuple(name for name, s in self.states.items() if s.state != "down")
        if usable == self._usable:
            return
        self._usable = usable
        if not usable:
            log.warning(
                "no builder is usable: the machines file lists none, so Nix builds locally "
                "where max-jobs allows, and otherwise fails with 'unable to start any build'"
            )
        else:
            log.info("usable builders: %s (%d of %d)", ", ".join(usable), len(usable), len(self.states))

    def changed(self, state: BuilderState) -> None:
        """`state` changed: publish() looks at it (and widens the lines if it got bigger)."""
        self._dirty.add(state)
        layout = (state.listed(), state.capacity())
        if layout != state.seen_layout:
            state.seen_layout = layout
            self._layout += 1
            if state.listed():
                self._width = max(self._width, state.capacity())
        status = (state.state, state.reason, state.failures, state.stalled)
        if status != state.seen_status:
            state.seen_status, self._status_news = status, True
        self._changed.set()

    async def run(self) -> None:
        """Follow every builder until cancelled."""
        self.publish()
        tasks = [asyncio.create_task(self.follow(s)) for s in self.states.values()]
        tasks.append(asyncio.create_task(self.watch_hooks()))
        tasks.append(asyncio.create_task(self.watch_stalls()))
        try:
            while True:
                try:
                    async with asyncio.timeout(STATUS_EVERY if self._status_due else None):
                        await self._changed.wait()
                except TimeoutError:
                    pass  # a status change left unwritten: publish() writes it now
                self._changed.clear()
                self.publish()
                await asyncio.sleep(0.05)  # coalesce bursts of updates into one write
        finally:
            for task in tasks:
                task.cancel()
            # Before the locks go (at exit): no moment with wide lines and nothing held.
            write_atomic(self.machines_path, self.static_content().encode())
            # A connection that does not close in time must not keep the service from stopping.
            await asyncio.wait(tasks, timeout=STOP_WITHIN)

    async def watch_hooks(self) -> None:
        """Follow this client's builds in flight (its hooks' slot locks) every HOOK_POLL s, and
        hold more as soon as a hook takes a slot: the next build must see the allowance left.
        Also count its builds waiting for a machine (the hook's passes) and tell the builders."""
        problem = ""
        passes = self._hook_passes()
        seen: tuple[frozenset[int] | None, int] | None = None  # others' locks and the width last looked at
        counted = read_at = 0.0
        flocked: set[int] | None = None
        others: frozenset[int] | None = None  # the flocked inodes not ours
        while True:
            await asyncio.sleep(HOOK_POLL)
            now = time.monotonic()
            # The waiting builds: at every pass of a hook, and as the last ones age out.
            if passes is not None and (passes.pending() or now - counted >= COUNT_EVERY):
                counted = now
                passes = self._count_waiting(passes, now)
            # /proc/locks is read while hooks pass (a hook takes its slot in a pass) and every
            # LOCKS_EVERY s otherwise (builds ending): each read costs the kernel an RCU grace
            # period and locks out every flock meanwhile.
            busy = passes is None or now - passes.passed_at < BUSY_FOR
            if busy or now - read_at >= LOCKS_EVERY:
                read_at = now
                try:
                    flocked = flocked_inodes(device=self.holds.device())
                    # Ours as of this read: the holds change between reads, /proc/locks does not.
                    others = frozenset(flocked - self.holds.own_inodes())
                    problem = ""
                except OSError as e:
                    flocked = others = None
                    if f"{e}" != problem:
                        log.warning("cannot read %s (%s): allowances go by the snapshots alone",
                                    PROC_LOCKS, e)  # fmt: skip
                    problem = f"{e}"
            width = self.width()
            # Every builder is looked at only when a lock not ours came or went: with hundreds
            # of builders, 20 times a second, most of the dispatcher's time went here.
            if (others, width) != seen:
                seen = (others, width)
                changed = False
                for state in self.states.values():
                    uri = state.builder.store_uri
                    taken = None if flocked is None else self.holds.taken_by_nix(uri, width, flocked)
                    moved, new = state.saw_hooks(taken)
                    changed = changed or moved
                    if passes is not None:
                        passes.took(now, new)
                if changed:
                    self.hold_slots()

    async def watch_stalls(self) -> None:
        """Leave out every builder whose stream sent nothing for stall_timeout.

        A stalled agent or a dead link: the keepalives, turned on now, will
        tell which. Until then the builder is left out, or Nix would keep
        sending it builds whose connections hang. One check of every stream
        a quarter of the timeout, and keepalives only while a stream is
        silent: 150 snapshots a second come from 300 builders, and a timer
        per read, like asyncssh's keepalive timer per packet, was set and
        cancelled again for each.
        """
        timeout = self.settings.stall_timeout
        while True:
            await asyncio.sleep(timeout / 4)
            now = time.monotonic()
            for state in self.states.values():
                if state.heard is not None and not state.stalled and now - state.heard >= timeout:
                    state.state, state.stalled = "degraded", True
                    state.reason = f"stream stalled: no snapshot for {timeout:g} s"
                    if state.connection is not None:
                        state.connection.set_keepalive(self.settings.keepalive, self.settings.keepalive_count)
                    self.changed(state)

    def _listed_uris(self) -> list[str]:
        """The store URIs of the builders listed now (they change with the layout only)."""
        if self._listed is None or self._listed[0] != self._layout:
            self._listed = (self._layout, [s.builder.store_uri for s in self.states.values() if s.listed()])
        return self._listed[1]

    def _hook_passes(self) -> HookPasses | None:
        try:
            # Looks back one round of Nix's questions at least (build-poll-interval).
            return HookPasses(self.holds.directory, window=self.settings.build_poll_interval + 1.0)
        except (InotifyUnavailable, OSError) as e:
            log.warning(
                "cannot watch %s (%s): builders are not told of the builds waiting", self.holds.directory, e
            )
            return None

    def _count_waiting(self, passes: HookPasses, now: float) -> HookPasses | None:
        """Read the hook's passes and tell each builder how many builds wait for it; None when
        watching stopped working (it was logged), so that nothing wrong is told."""
        try:
            passes.watch(self._listed_uris())
            passes.read(now, self.holds.take_own_opens())
        except OSError as e:
            log.warning("cannot watch %s any more (%s): builders are not told of the builds waiting",
                        self.holds.directory, e)  # fmt: skip
            passes.close()
            return None
        for state in self.states.values():
            state.saw_waiting(passes.waiting(state.builder.store_uri, now), now)
            state.tell_demand()
        return passes

    async def follow(self, state: BuilderState) -> None:
        """Keep one stream to `state.builder` going, forever, with backoff on failure."""
        while True:
            delay = state.retry_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            connected = time.time()
            try:
                await self._stream(state)
                reason = "stream ended"
                outcome = "down"
            except StreamEnded as e:
                if state.last_seen is not None and state.last_seen >= connected and state.listed():
                    # It ended after snapshots came, cleanly: the builder's agent restarted (it
                    # serves the streams, relay.py), or the stream reached its longest. Not a
                    # failure: connect again at once, keeping the last snapshot meanwhile.
                    log.info("%s: %s; connecting again", state.builder.name, e)
                    await asyncio.sleep(random.uniform(0.5, 1.5))  # noqa: S311 - jitter, not security
                    continue
                reason, outcome = f"unreachable: {_describe(e)}", "down"
            except BadSnapshot as e:
                reason, outcome = f"bad metrics: {e}", "degraded"
            except (TimeoutError, OSError, asyncssh.Error) as e:
                reason, outcome = f"unreachable: {_describe(e)}", "down"
            delay = state.failed(outcome, reason, self.settings)
            log.warning("%s is %s (%s); next attempt in %.0f s", state.builder.name, outcome, reason, delay)
            self.changed(state)

    async def _stream(self, state: BuilderState) -> None:
        """Take the builder's snapshots until its stream ends (StreamEnded, OSError) or sends
        garbage (BadSnapshot)."""

        def take(lines: list[bytes]) -> None:
            state.heard = time.monotonic()
            if lines and state.stalled and state.connection is not None:
                state.connection.set_keepalive(0)  # snapshots again: no keepalives (watch_stalls())
            for line in lines:
                state.healthy(validate(line), time.time(), self.settings.disk_grace, line)
                self.changed(state)

        b = self.builder_connection(state.builder)
        async with asyncssh.connect(**b) as conn:
            # watch_stalls() follows it from now on (also while the session opens).
            state.connection, state.heard = conn, time.monotonic()
            session = SnapshotSession(take)
            try:
                command = f"nixfarm stream --interval {self.settings.interval:g}"
                channel, _ = await conn.create_session(lambda: session, command, encoding=None)
                state.stream_input, state.told = channel, None  # a new stream is told anew
                accounts = asyncio.create_task(self._poll_accounts(state, conn))
                try:
                    await session.ended
                finally:
                    accounts.cancel()
            finally:
                state.connection = state.stream_input = state.heard = None
                session.ended.cancel()  # what the closing connection reports, nobody would read

    async def _poll_accounts(self, state: BuilderState, conn: asyncssh.SSHClientConnection) -> None:
        """Every ACCOUNTS_EVERY seconds, the builder's accounts (a session on the stream's connection).

        Best effort: an older builder refuses `nixfarm accounts`, and usage then lacks it.
        """
        from .farmview import check_report

        while True:
            try:
                answer = await run_for_line(conn, "nixfarm accounts", MAX_LINE, ACCOUNTS_TIMEOUT)
                if answer.how == "line":
                    report = check_report(answer.line)
                    state.accounts = {"clients": report["clients"], "time": time.time()}
            except (asyncssh.Error, OSError, TimeoutError, ValueError) as e:
                log.info("%s: no accounts (%s)", state.builder.name, _describe(e))
            await asyncio.sleep(ACCOUNTS_EVERY)

    def builder_connection(self, b: Builder) -> dict[str, Any]:
        """asyncssh.connect() arguments: the client key, the pinned host key; keepalives are
        turned on only while the stream is silent (watch_stalls())."""
        options = connect_options(
            self.inventory.key_file,
            b,
            connect_timeout=max(5.0, self.settings.keepalive * self.settings.keepalive_count),
        )
        return {**options, "encryption_algs": list(STREAM_CIPHERS)}


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno).lower()  # "connection refused", "no route to host"
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:200]


def run_dispatch(
    inventory: Inventory, machines_path: str, settings: Settings, status_path: str, holds: SlotHolds
) -> int:
    """Entry point of `nixfarm dispatch`: runs until SIGTERM or SIGINT."""
    from ..common import logs

    logs.setup("nixfarm.dispatch", "nixfarm-dispatch")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)  # it logs every connection at INFO
    dispatcher = Dispatcher(inventory, machines_path, settings, status_path, holds)

    async def main() -> None:
        task = asyncio.create_task(dispatcher.run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # Input is taken in batches, as often as the hooks are polled (loop.py).
    with asyncio.Runner(loop_factory=lambda: batching_loop(HOOK_POLL)) as runner:
        runner.run(main())
    return 0
