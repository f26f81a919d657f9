"""Per-client accounts of a builder: builds, build time, CPU time and SSH traffic.

The agent service looks every `usage_sample_interval` (attribution.py says
how it tells whose a build or a connection is) and keeps, per client:

  builds_started, builds_finished, builds_failed   counts
  build_seconds, cpu_seconds                       of builds that ended
  received_bytes, sent_bytes                       on the client's SSH connections

as all-time totals and as sums per hour for the last KEEP_HOURS hours, so that
`nixfarm accounts --since 1d` can answer for a window (to the hour). They are
kept in `state_dir/accounts.json` across restarts. Builds no gateway session
started (the builder's own) are the client "" (shown as "(local)").

What sampling misses, and says here rather than hides: a connection's last
interval of traffic (it is gone before the next look), and the CPU time of a
build's processes that neither ended under another of its processes nor
lived until a look. A build whose outputs are not valid in the store
FAILED_AFTER seconds after its processes ended counts as failed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from . import attribution
from .atomic import write_atomic
from .sessions import live_sessions

COUNTERS = (
    "builds_started",
    "builds_finished",
    "builds_failed",
    "build_seconds",
    "cpu_seconds",
    "received_bytes",
    "sent_bytes",
)
RECORD = "accounts.json"
RUNNING_RECORD = "running.json"  # the builds running now, for snapshots
LOCAL = ""  # the client of builds no gateway session started
KEEP_HOURS = 31 * 24
MAX_CLIENTS = 4096  # kept in the record; more is not a farm but an attack on it
MAX_RUNNING = 256  # builds listed in a snapshot
SAVE_EVERY = 10.0
FAILED_AFTER = 30.0  # seconds for a finished build's outputs to become valid ...
REGISTERING_FOR = 600.0  # ... or, where they are on disk already, to be hashed and registered
DB_PATH = "/nix/var/nix/db/db.sqlite"

log = logging.getLogger("nixfarm.agent")

Counts = dict[str, float]


def zero() -> Counts:
    return dict.fromkeys(COUNTERS, 0)


def add(into: Counts, more: Counts) -> None:
    for key in COUNTERS:
        into[key] = into.get(key, 0) + more.get(key, 0)


class Ledger:
    """The counters: all-time totals and hourly sums per client; saved as JSON."""

    def __init__(self) -> None:
        self.totals: dict[str, Counts] = {}
        self.hours: dict[int, dict[str, Counts]] = {}  # hour (epoch // 3600) -> client -> sums
        self.changed = False

    def count(self, client: str, now: float, **amounts: float) -> None:
        if client not in self.totals and len(self.totals) >= MAX_CLIENTS:
            client = "(others)"
        hour = self.hours.setdefault(int(now // 3600), {})
        for bucket in (self.totals.setdefault(client, zero()), hour.setdefault(client, zero())):
            add(bucket, amounts)
        self.changed = True

    def window(self, since: float | None, now: float) -> dict[str, Counts]:
        """Per client, the sums since `since` (from the start of its hour), or all time if None."""
        if since is None:
            return {client: dict(counts) for client, counts in self.totals.items()}
        first = int(since // 3600)
        out: dict[str, Counts] = {}
        for hour, clients in self.hours.items():
            if first <= hour <= now // 3600:
                for client, counts in clients.items():
                    add(out.setdefault(client, zero()), counts)
        return out

    def forget_old(self, now: float) -> None:
        oldest = int(now // 3600) - KEEP_HOURS
        for hour in [h for h in self.hours if h < oldest]:
            del self.hours[hour]

    def to_json(self) -> bytes:
        return json.dumps({
            "version": 1,
            "totals": self.totals,
            "hours": {str(h): c for h, c in sorted(self.hours.items())},
        }).encode()  # fmt: skip

    @classmethod
    def from_json(cls, data: bytes) -> Ledger:
        """A ledger from its record; ValueError if the record is not one."""
        try:
            raw = json.loads(data)
            ledger = cls()
            ledger.totals = {str(c): _counts(v) for c, v in list(raw["totals"].items())[:MAX_CLIENTS]}
            ledger.hours = {
                int(h): {str(c): _counts(v) for c, v in list(clients.items())[:MAX_CLIENTS]}
                for h, clients in list(raw["hours"].items())[-KEEP_HOURS:]
            }
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not an accounts record: {e}") from None
        return ledger


def _counts(value: Any) -> Counts:
    if not isinstance(value, dict):
        raise TypeError("counters must be an object")
    counts = zero()
    for key in COUNTERS:
        number = value.get(key, 0)
        if not isinstance(number, int | float) or isinstance(number, bool) or number < 0:
            raise TypeError(f"{key} must be a non-negative number")
        counts[key] = number
    return counts


def read_ledger(state_dir: str) -> Ledger | None:
    """The agent's record, or None where there is none or it cannot be read."""
    try:
        with open(os.path.join(state_dir, RECORD), "rb") as f:
            return Ledger.from_json(f.read(64 << 20))
    except (OSError, ValueError):
        return None


@dataclass
class RunningBuild:
    client: str
    name: str
    outputs: list[str]
    started: float  # epoch seconds
    cpu_ticks: int
    last_seen: float
    ended: float = 0.0  # epoch seconds, once its processes are gone


class Accountant:
    """The agent's side: looks at builds and connections, keeps the ledger."""

    def __init__(self, state_dir: str, build_uids: frozenset[int], db_path: str = DB_PATH) -> None:
        self.state_dir = state_dir
        self.build_uids = build_uids
        self.db_path = db_path
        self.ledger = Ledger()
        self.running: dict[tuple[int, int], RunningBuild] = {}  # (top PID, start) -> build
        self.pending: list[RunningBuild] = []  # ended, outputs not valid yet
        self.workers: dict[int, str] = {}  # worker PID -> client (a worker serves one connection)
        self.connections: dict[int, tuple[str, int, int]] = {}  # inode -> (client, received, sent)
        self._tick = os.sysconf("SC_CLK_TCK")
        self._boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        self._first_look = True
        self._saved = 0.0

    def load(self) -> None:
        path = os.path.join(self.state_dir, RECORD)
        try:
            with open(path, "rb") as f:
                self.ledger = Ledger.from_json(f.read(64 << 20))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("accounts record %s unreadable (%s): starting from zero", path, e)

    def save(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.ledger.changed or (not force and now - self._saved < SAVE_EVERY):
            return
        self.ledger.forget_old(time.time())
        write_atomic(os.path.join(self.state_dir, RECORD), self.ledger.to_json())
        self.ledger.changed = False
        self._saved = now

    def look(self) -> None:
        """One look at builds and connections; counts what changed since the last."""
        now = time.time()
        sessions = live_sessions(self.state_dir)
        self._look_at_builds(now, sessions)
        self._look_at_traffic(now, sessions)
        self._settle(now)
        self._first_look = False
        self._publish_running(now)

    # -- builds -------------------------------------------------------------

    def _look_at_builds(self, now: float, sessions: dict[int, str]) -> None:
        seen: dict[tuple[int, int], attribution.BuildProcesses] = {}
        new = []
        for build in attribution.scan_builds(self.build_uids).values():
            key = (build.top, build.started)
            seen[key] = build
            known = self.running.get(key)
            if known is None:
                new.append((key, build))
            else:
                known.cpu_ticks = max(known.cpu_ticks, build.cpu_ticks)
                known.last_seen = now
        if new:
            self._start(now, new, sessions)
        for key in [k for k in self.running if k not in seen]:
            gone = self.running.pop(key)
            gone.ended = (gone.last_seen + now) / 2  # it ended between the two looks
            self.ledger.count(
                gone.client,
                now,
                build_seconds=max(0.0, gone.ended - gone.started),
                cpu_seconds=gone.cpu_ticks / self._tick,
            )
            self.pending.append(gone)

    def _start(
        self,
        now: float,
        new: list[tuple[tuple[int, int], attribution.BuildProcesses]],
        sessions: dict[int, str],
    ) -> None:
        found = []
        for key, build in new:
            try:
                name, outputs = attribution.derivation_of(attribution.read_environ(build.top))
            except OSError:
                continue  # gone already: too short to account
            found.append((key, build, name, outputs))
        workers = attribution.workers_building({o for *_, outputs in found for o in outputs})
        for key, build, name, outputs in found:
            worker = next((workers[o] for o in outputs if o in workers), None)
            client = LOCAL if worker is None else self._client_of_worker(worker, sessions)
            started = self._boot + build.started / self._tick
            self.running[key] = RunningBuild(client, name, outputs, started, build.cpu_ticks, now)
            self.ledger.count(client, now, builds_started=1)

    def _client_of_worker(self, worker: int, sessions: dict[int, str]) -> str:
        if worker not in self.workers:
            try:
                client = attribution.client_of_worker(worker, sessions)
            except OSError as e:  # sock_diag unavailable: builds stay unattributed
                log.warning("cannot tell whose build worker %d serves: %s", worker, e)
                client = None
            self.workers[worker] = LOCAL if client is None else client
            if len(self.workers) > 4096:  # forget the oldest workers
                for old in list(self.workers)[:1024]:
                    del self.workers[old]
        return self.workers[worker]

    def _settle(self, now: float) -> None:
        """Count each ended build as finished once its outputs are valid, or as failed."""
        if not self.pending:
            return
        valid = self._valid({o for b in self.pending for o in b.outputs})
        still = []
        for build in self.pending:
            waited = now - build.ended
            if build.outputs and all(o in valid for o in build.outputs):
                self.ledger.count(build.client, now, builds_finished=1)
            elif waited < FAILED_AFTER or (
                waited < REGISTERING_FOR and any(os.path.lexists(o) for o in build.outputs)
            ):
                still.append(build)
            else:
                self.ledger.count(build.client, now, builds_failed=1)
        self.pending = still

    def _valid(self, paths: set[str]) -> set[str]:
        if not paths:
            return set()
        try:
            db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5)
            try:
                rows = db.execute(
                    f"SELECT path FROM ValidPaths WHERE path IN ({','.join('?' * len(paths))})",  # noqa: S608 - placeholders only
                    sorted(paths),
                ).fetchall()
            finally:
                db.close()
        except sqlite3.Error as e:
            log.warning("cannot read the Nix database %s: %s", self.db_path, e)
            return set()
        return {row[0] for row in rows}

    # -- traffic ------------------------------------------------------------

    def _look_at_traffic(self, now: float, sessions: dict[int, str]) -> None:
        if not sessions and not self.connections:
            return
        try:
            tcp = attribution.tcp_connections()
        except OSError as e:
            log.warning("cannot read TCP connections: %s", e)
            return
        clients: dict[int, str | None] = dict.fromkeys(tcp)
        for inode, (client, _, _) in self.connections.items():
            if inode in tcp:
                clients[inode] = client
        for pid, client in sessions.items():
            found = attribution.connection_of(pid, tcp)
            if found is not None:
                clients[found] = client
        seen: dict[int, tuple[str, int, int]] = {}
        for inode, owner in clients.items():
            if owner is None:
                continue
            client = owner
            received, sent = tcp[inode]
            _, was_received, was_sent = self.connections.get(inode, (client, 0, 0))
            if inode not in self.connections and self._first_look:
                was_received, was_sent = received, sent  # counted before the agent restarted
            if received > was_received or sent > was_sent:
                self.ledger.count(
                    client,
                    now,
                    received_bytes=max(0, received - was_received),
                    sent_bytes=max(0, sent - was_sent),
                )
            seen[inode] = (client, received, sent)
        self.connections = seen

    # -- what snapshots show ------------------------------------------------------

    def _publish_running(self, now: float) -> None:
        builds = sorted(self.running.values(), key=lambda b: b.started)[:MAX_RUNNING]
        record = {
            "time": now,
            "running": [
                {
                    "client": b.client,
                    "name": b.name,
                    "started": round(b.started, 2),
                    "cpu_seconds": round(b.cpu_ticks / self._tick, 2),
                }
                for b in builds
            ],
        }
        path = os.path.join(self.state_dir, RUNNING_RECORD)
        try:
            write_atomic(path, json.dumps(record).encode(), durable=False)
        except OSError as e:
            log.warning("cannot record the running builds in %s: %s", self.state_dir, e)


def read_running(state_dir: str, fresh_for: float = 30.0) -> list[dict[str, Any]] | None:
    """The running builds as the agent last saw them: client, name, seconds, cpu_seconds.

    None where there is no fresh record (no agent service).
    """
    try:
        with open(os.path.join(state_dir, RUNNING_RECORD), "rb") as f:
            record = json.loads(f.read(1 << 20))
        now = time.time()
        if not 0 <= now - float(record["time"]) <= fresh_for:
            return None
        return [
            {
                "client": str(b["client"]),
                "name": str(b["name"])[: attribution.MAX_NAME],
                "seconds": round(max(0.0, now - float(b["started"])), 1),
                "cpu_seconds": float(b["cpu_seconds"]),
            }
            for b in record["running"][:MAX_RUNNING]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def report(state_dir: str, since: float | None, now: float | None = None) -> dict[str, Any]:
    """This builder's accounts per client, all time or since `since`: what `nixfarm accounts` prints."""
    now = time.time() if now is None else now
    ledger = read_ledger(state_dir)
    return {
        "builder": socket.gethostname(),
        "since": since,
        "until": now,
        "recorded": ledger is not None,
        "clients": {} if ledger is None else ledger.window(since, now),
    }
