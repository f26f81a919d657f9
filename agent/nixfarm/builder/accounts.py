"""Per-client accounts of a builder: builds, build time, CPU time and SSH traffic.

Every build is seen as Nix opens and closes its log (buildlog.py), and
whose it is as attribution.py says. The agent keeps, per client:

  builds_started, builds_finished, builds_failed   counts
  build_seconds, cpu_seconds                       of builds that ended
  received_bytes, sent_bytes                       on the client's SSH connections

as all-time totals and as sums per hour for the last KEEP_HOURS hours, so that
`nixfarm accounts --since 1d` can answer for a window (to the hour). They are
kept in `state_dir/accounts.json` across restarts. Builds no gateway session
started (the builder's own) are the client "" (shown as "(local)").

A build whose outputs are not valid in the store FAILED_AFTER seconds after
its log closed (REGISTERING_FOR, where they are on disk, being registered)
counts as failed. What is sampled, every look, and so approximate: CPU time
(the build's processes that lived until a look, and what they reaped), and
traffic (the last interval of a connection is gone before the next look).
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..common.atomic import write_atomic
from ..common.inotify import IN_CLOSE_WRITE, Inotify, InotifyUnavailable
from ..common.store import DB_PATH, StoreError, valid_paths
from . import attribution, buildlog
from .processes import ProcessTable
from .sessions import live_sessions, sessions_dir, start_ticks
from .traffic import TrafficMeter, destroy_listener

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
FAILED_AFTER = 5.0  # seconds for a finished build's outputs to become valid ...
REGISTERING_FOR = 600.0  # ... or, where they are on disk already, to be hashed and registered

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
    drv: str  # <hash>-<name>.drv
    client: str
    worker: int  # PID of the Nix process building it; 0 if unknown
    worker_started: int  # its start, clock ticks since boot
    outputs: list[str]
    started: float  # epoch seconds
    cpu_ticks: int = 0
    ended: float = 0.0  # epoch seconds, once its log is closed

    @property
    def name(self) -> str:
        return buildlog.drv_name(self.drv)


class Accountant:
    """The agent's side: follows builds and connections, keeps the ledger.

    A thread follows the build logs (buildlog.py) and tells at each start whose
    build it is, while its worker is surely alive; `look()`, from the agent's
    loop, counts what the thread saw, samples the builds' CPU time and the
    connections' traffic, and settles ended builds as finished or failed.
    """

    def __init__(
        self,
        state_dir: str,
        build_uids: frozenset[int],
        db_path: str = DB_PATH,
        log_dir: str = buildlog.LOG_DIR,
        temproots: str = attribution.TEMPROOTS,
    ) -> None:
        self.state_dir = state_dir
        self.build_uids = build_uids
        # Its own table, not the snapshot's: this runs in the accountant's thread. Each
        # second it lists /proc and reads only the new processes and the builds' own.
        self._table = ProcessTable(build_uids)
        self.db_path = db_path
        self.log_dir = log_dir
        self.temproots = temproots
        self.ledger = Ledger()
        self.running: dict[str, RunningBuild] = {}  # by .drv name
        self.pending: list[RunningBuild] = []  # ended, outputs not valid yet
        self.traffic = TrafficMeter()
        self._processes: dict[tuple[int, int], str] = {}  # (builder PID, start) -> .drv name
        self._workers: dict[int, str] = {}  # worker PID -> client (the watch thread's only)
        self._seen: list[tuple[buildlog.LogEvent, RunningBuild | None]] = []  # from the thread
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick = os.sysconf("SC_CLK_TCK")
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
        with self._lock:
            self.ledger.forget_old(time.time())
            record = self.ledger.to_json()
            self.ledger.changed = False
        try:
            write_atomic(os.path.join(self.state_dir, RECORD), record)
        except OSError:
            self.ledger.changed = True  # saved at the next try
            raise
        self._saved = now

    def look(self) -> None:
        """Count what the build log thread saw, the builds' CPU time and the connections' traffic."""
        now = time.time()
        with self._lock:  # against the thread, and report() from the control socket's
            self._look_at_builds(now)
            self._count_traffic(now, self.traffic.look())
            self._settle(now)
        self._publish_running(now)

    def report(self, since: float | None) -> dict[str, Any]:
        """The accounts now, as `nixfarm accounts` prints them (the control socket asks)."""
        now = time.time()
        with self._lock:
            clients = self.ledger.window(since, now)
        return {
            "builder": socket.gethostname(),
            "since": since,
            "until": now,
            "recorded": True,
            "clients": clients,
        }

    # -- the build log thread ------------------------------------------------

    def start(self) -> None:
        """Follow the build logs in a thread until `stop()`."""
        try:
            watch = buildlog.BuildLogWatch(self.log_dir)
        except InotifyUnavailable as e:
            log.warning("cannot follow the build logs (%s): no per-client build counts", e)
            return
        self._thread = threading.Thread(target=self._follow, args=(watch,), name="buildlog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _follow(self, watch: buildlog.BuildLogWatch) -> None:
        sessions = self._watch_sessions()
        destroyed = self._destroy_listener()
        try:
            while not self._stopping.is_set():
                if not watch.watching:  # no build has run here yet: the directory comes with the first
                    self._seen_builds(watch.start())
                ready, _, _ = select.select([x for x in (watch, sessions, destroyed) if x], [], [], 1.0)
                if watch in ready:
                    self._seen_builds(watch.read())
                if sessions is not None and sessions in ready:
                    self._seen_sessions(sessions)
                if destroyed in ready:
                    with self._lock:
                        for message in destroyed.get():
                            self._count_traffic(time.time(), self.traffic.destroyed(message))
        except Exception:  # the agent goes on; only its accounts stop
            log.exception("following builds and sessions failed")
        finally:
            for closable in (watch, sessions, destroyed):
                if closable:
                    closable.close()

    def _seen_builds(self, events: list[buildlog.LogEvent]) -> None:
        for event in events:
            build = self._whose(event) if event.kind == "start" else None
            with self._lock:
                self._seen.append((event, build))

    def _watch_sessions(self) -> Inotify | None:
        """inotify on the gateway's session records; the sessions open now, known from now on."""
        try:
            watch = Inotify()
            watch.add_watch(sessions_dir(self.state_dir), IN_CLOSE_WRITE)
        except (InotifyUnavailable, OSError) as e:
            log.warning("cannot follow the gateway's sessions (%s): no per-client traffic", e)
            return None
        self._map_sessions(baseline=True)
        return watch

    def _seen_sessions(self, watch: Inotify) -> None:
        watch.read_named()
        self._map_sessions(baseline=False)

    def _map_sessions(self, baseline: bool) -> None:
        try:
            with self._lock:
                self.traffic.sessions_started(live_sessions(self.state_dir), baseline)
        except OSError as e:  # sock_diag unavailable
            log.warning("cannot tell which connections the gateway's sessions use: %s", e)

    @staticmethod
    def _destroy_listener() -> Any:
        try:
            return destroy_listener()
        except Exception as e:  # pyroute2 raises its own errors too
            log.info("closing connections are not reported (%s): their last second is not counted", e)
            return None

    def _count_traffic(self, now: float, counted: list[tuple[str, int, int]]) -> None:
        for client, received, sent in counted:
            self.ledger.count(client, now, received_bytes=received, sent_bytes=sent)

    def _whose(self, event: buildlog.LogEvent) -> RunningBuild:
        """The build that just started: its worker, client and outputs."""
        found = buildlog.worker_of(event.drv, self.temproots)
        worker, outputs = found if found else (0, [])
        client, started = LOCAL, 0
        if worker:
            try:
                started = start_ticks(worker)
            except (OSError, IndexError, ValueError):
                worker = 0
        if worker:
            if worker not in self._workers:
                self._workers[worker] = self._client_of_worker(worker)
                if len(self._workers) > 4096:  # forget the oldest workers
                    for old in list(self._workers)[:1024]:
                        del self._workers[old]
            client = self._workers[worker]
        return RunningBuild(event.drv, client, worker, started, outputs, event.time)

    def _client_of_worker(self, worker: int) -> str:
        try:
            client = attribution.client_of_worker(worker, live_sessions(self.state_dir))
        except OSError as e:  # sock_diag unavailable: builds stay unattributed
            log.warning("cannot tell whose build worker %d serves: %s", worker, e)
            client = None
        return LOCAL if client is None else client

    # -- builds, from the agent's loop -------------------------------------------

    def _look_at_builds(self, now: float) -> None:
        seen, self._seen = self._seen, []  # (look() holds the lock)
        for event, build in seen:
            if build is not None:
                self.ledger.count(build.client, now, builds_started=1)
                if build.worker:
                    self.running[event.drv] = build
                else:  # over before we looked (or not a daemon's build): nothing to follow
                    self._ended(build, event.time, now)
            elif event.drv in self.running:
                self._ended(self.running.pop(event.drv), event.time, now)
        # A build whose worker is gone is over, even if its log's close went unseen.
        for drv, build in list(self.running.items()):
            if build.worker and not attribution.is_alive(build.worker, build.worker_started):
                self._ended(self.running.pop(drv), now, now)
        if self.running:
            self._sample_cpu()

    def _ended(self, build: RunningBuild, ended: float, now: float) -> None:
        build.ended = ended
        self.ledger.count(
            build.client,
            now,
            build_seconds=max(0.0, ended - build.started),
            cpu_seconds=build.cpu_ticks / self._tick,
        )
        self.pending.append(build)

    def _sample_cpu(self) -> None:
        """Each running build's CPU time so far, from its processes (matched by their outputs)."""
        by_output = {o: b for b in self.running.values() for o in b.outputs}
        seen = {}
        self._table.look()
        for pids in self._table.build_pids().values():
            procs = attribution.build_processes(pids)
            if procs is None:
                continue
            key = (procs.top, procs.started)
            drv = self._processes.get(key)
            if drv is None:
                try:
                    _, outputs = attribution.derivation_of(attribution.read_environ(procs.top))
                except OSError:
                    continue
                build = next((by_output[o] for o in outputs if o in by_output), None)
                if build is None:
                    continue
                drv = build.drv
            seen[key] = drv
            if drv in self.running:
                self.running[drv].cpu_ticks = max(self.running[drv].cpu_ticks, procs.cpu_ticks)
        self._processes = seen

    def _settle(self, now: float) -> None:
        """Count each ended build as finished once its outputs are valid, or as failed."""
        if not self.pending:
            return
        valid = self._valid({o for b in self.pending for o in b.outputs})
        still = []
        for build in self.pending:
            waited = now - build.ended
            if all(o in valid for o in build.outputs):  # (no outputs known: its log closed, so done)
                self.ledger.count(build.client, now, builds_finished=1)
            elif waited < FAILED_AFTER or (
                waited < REGISTERING_FOR and any(os.path.lexists(o) for o in build.outputs)
            ):
                still.append(build)
            else:
                self.ledger.count(build.client, now, builds_failed=1)
        self.pending = still

    def _valid(self, paths: set[str]) -> set[str]:
        try:
            return valid_paths(paths, self.db_path)
        except StoreError as e:
            log.warning("%s", e)
            return set()

    # -- what snapshots show ------------------------------------------------------

    def _publish_running(self, now: float) -> None:
        builds = sorted(self.running.values(), key=lambda b: b.started)[:MAX_RUNNING]
        record = {
            "time": now,
            "running": [
                {
                    "client": b.client,
                    "name": b.name[: attribution.MAX_NAME],
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
    """This builder's accounts per client, all time or since `since`, from the agent's record
    (up to SAVE_EVERY seconds old): where the agent does not answer itself."""
    now = time.time() if now is None else now
    ledger = read_ledger(state_dir)
    return {
        "builder": socket.gethostname(),
        "since": since,
        "until": now,
        "recorded": ledger is not None,
        "clients": {} if ledger is None else ledger.window(since, now),
    }
