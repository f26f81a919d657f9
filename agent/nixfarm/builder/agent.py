"""`nixfarm agent`: the builder service.

Main thread: readiness and watchdog pings for systemd, a free-space check
every `gc_check_interval` (a statvfs), usage samples while builds run, and a
STATUS line. A GC pass runs in a worker thread, so a long pass never starves
the watchdog; a failing pass is retried with exponential backoff, never in a
tight loop. The control socket serves `nixfarm gc --now / --dry-run`.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from typing import Any

from ..common import logs
from ..common.notify import notify, watchdog_interval
from . import control, demand, relay, sessions
from .accounts import Accountant
from .config import AgentConfig, split_listen
from .exporter import Exporter
from .gc import GarbageCollector, GcResult, filesystem, resolve_limits
from .metrics import Collector, read_store_fs
from .prometheus import render
from .usage import UsageRecords, paths_in_use

BACKOFF_FIRST = 5.0
BACKOFF_MAX = 300.0
SAVE_EVERY = 30.0
NEAR_FACTOR = 5  # check free space this many times more often below max-free


class Agent:
    """The builder service; `run()` until SIGTERM."""

    def __init__(self, config: AgentConfig, interval: float) -> None:
        self.config = config
        self.interval = interval
        self.log = logs.setup("nixfarm.agent", "nixfarm-agent")
        self.collector = Collector(config)
        self.builds = self.collector.builds  # the status line's snapshots look through it too
        self.usage = UsageRecords(config.state_dir, config.store_dir)
        self.usage.load()
        self.gc = GarbageCollector(config, self.usage)
        self.accounts = Accountant(config.state_dir, self.collector.build_uids)
        self.accounts.load()
        self.stopping = False
        self.streams: relay.StreamServer | None = None
        self.last_snapshot: dict[str, Any] = {}
        self._worker: threading.Thread | None = None
        self._backoff = BACKOFF_FIRST
        self._retry_at = 0.0
        # Fail at start, with the key named, rather than at the first full disk
        # (and with exit code 3 and one line if there is no store at all).
        resolve_limits(config, read_store_fs(config.store_dir))

    # -- requests from the control socket --------------------------------

    def handle(self, req: dict[str, Any], send: control.Send) -> None:
        """Serve one control request (see control.py)."""
        command = req.get("command")
        target = req.get("target_free")
        if target is not None and not isinstance(target, int):
            send({"event": "error", "message": "target_free must be a number of bytes"})
        elif command == "gc-now":
            result = self.gc.run("requested", target, progress=send)
            if result is None:
                send({"event": "busy", "message": "a GC pass is already running"})
            else:
                self._log_result(result)
                send({"event": "done", "result": result.as_dict()})
        elif command == "dry-run":
            send({"event": "done", "result": self.gc.dry_run(target)})
        elif command == "accounts":
            since = req.get("since")
            if since is not None and (not isinstance(since, int | float) or isinstance(since, bool)):
                send({"event": "error", "message": "since must be a time (epoch seconds) or null"})
            else:
                send({"event": "done", "result": self.accounts.report(since)})
        else:
            send({"event": "error", "message": f"unknown command {command!r}"})

    # -- the loop ----------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for what, directory in (
            ("the clients' demand (streams will not report it)", demand.demand_dir(self.config.state_dir)),
            ("the gateway's sessions (no per-client accounts)", sessions.sessions_dir(self.config.state_dir)),
        ):
            try:
                demand.prepare_dir(directory, self.config.control_group)
            except (OSError, KeyError) as e:  # KeyError: no such group
                self.log.warning("no place for %s: %s", what, e)
        server = control.ControlServer(
            control.socket_path(self.config.state_dir), self.config.control_group, self.handle
        )
        self.accounts.start()
        exporter = self._start_exporter()
        self.streams = relay.start_server(self.config, self.log.warning)
        if self.streams:
            streams = self.streams
            self.collector.live_demand = lambda: streams.demand
        watchdog = watchdog_interval()
        # Sleep until the next thing is due (a check comes sooner below max-free),
        # and never longer than the watchdog allows between pings.
        longest_sleep = min(watchdog or self.interval, self.interval)
        due = {
            "check": 0.0,
            "sample": 0.0,
            "snapshot": 0.0,
            "status": 0.0,
            "save": time.monotonic() + SAVE_EVERY,
        }
        last_status = ""
        try:
            while not self.stopping:
                now = time.monotonic()
                if now >= due["check"]:
                    due["check"] = now + self._check_free_space()
                if now >= due["sample"]:
                    due["sample"] = now + self._sample_usage()
                if now >= due["snapshot"]:
                    self._snapshot()
                    due["snapshot"] = now + self.config.snapshot_interval
                if now >= due["status"]:
                    status = self._status_line()
                    if status != last_status:
                        notify(f"STATUS={status}")
                        if not last_status:
                            notify("READY=1")
                            self.log.info("ready: %s", status)
                        last_status = status
                    due["status"] = now + self.interval
                if now >= due["save"]:
                    self.usage.save()
                    due["save"] = now + SAVE_EVERY
                self._save_accounts(force=False)
                if watchdog:
                    notify("WATCHDOG=1")
                time.sleep(min(longest_sleep, max(0.01, min(due.values()) - time.monotonic())))
        finally:
            server.close()
            if exporter:
                exporter.close()
            if self.streams:
                self.streams.close()
            self.gc.stop_requested = True
            if self._worker:
                self._worker.join(timeout=60)
            self.usage.save()
            self.accounts.stop()
            self._save_accounts(force=True)
            self.collector.close()
        notify("STOPPING=1")
        self.log.info("stopping")
        return 0

    def _stop(self, _signum: int, _frame: object) -> None:
        self.stopping = True

    def _snapshot(self) -> None:
        """Take the builder's snapshot: one per snapshot_interval, for every stream (relay.py)."""
        self.last_snapshot = self.collector.snapshot()
        for warning in self.collector.take_warnings():
            self.log.warning("%s", warning)
        if self.streams:
            self.streams.publish(json.dumps(self.last_snapshot, sort_keys=True).encode() + b"\n")
            while self.streams.problems:
                self.log.error("%s", self.streams.problems.pop(0))

    def _status_line(self) -> str:
        snap = self.last_snapshot
        gc = "GC running, " if self._worker and self._worker.is_alive() else ""
        return (
            f"{gc}store {snap['store']['free_bytes'] / 2**20:.0f} MiB free, "
            f"{snap['builds']['active']} builds running"
        )

    def _sample_usage(self) -> float:
        """Record what running builds use, and which builds ended; returns seconds until the next sample.

        Sampled at the same rate when idle, or the first seconds of a build
        would go unseen; with no build running only the temp roots are read.
        """
        uids = self.collector.build_uids
        active = self.builds.look()["active"] > 0
        self.usage.record(paths_in_use(uids if active else frozenset()))
        self.accounts.look()
        if self.builds.unsaved:
            try:
                self.builds.save(self.config.state_dir)
            except OSError as e:  # streams then go by what they saw themselves
                self.log.warning("cannot record finished builds in %s: %s", self.config.state_dir, e)
        return self.config.usage_sample_interval

    def _start_exporter(self) -> Exporter | None:
        """The Prometheus endpoint, where prometheus_listen asks for one.

        A port that cannot be had is logged, not fatal: the store GC matters more.
        """
        if not self.config.prometheus_listen:
            return None
        host, port = split_listen(self.config.prometheus_listen)

        def text() -> str:
            # The agent's latest snapshot (one per snapshot_interval, as the streams get):
            # a scrape costs no look at the machine of its own.
            if not self.last_snapshot:
                raise RuntimeError("no snapshot yet")
            return render(self.last_snapshot, self.accounts.report(None)["clients"])

        try:
            exporter = Exporter(host, port, text)
        except OSError as e:
            self.log.error("no Prometheus endpoint on %s: %s", self.config.prometheus_listen, e.strerror)
            return None
        self.log.info("Prometheus metrics at http://%s/metrics", self.config.prometheus_listen)
        return exporter

    def _save_accounts(self, force: bool) -> None:
        try:
            self.accounts.save(force)
        except OSError as e:  # kept in memory; tried again at the next save
            self.log.warning("cannot save the accounts in %s: %s", self.config.state_dir, e)

    def _check_free_space(self) -> float:
        """Start a pass if free space is below min-free; returns seconds until the next check.

        Below max-free the store may be filling fast (parallel builds), so it is
        checked more often there; a statvfs costs microseconds.
        """
        interval = self.config.gc_check_interval
        if (self._worker and self._worker.is_alive()) or time.monotonic() < self._retry_at:
            return interval / NEAR_FACTOR
        try:
            fs = filesystem(self.config.store_dir)
        except OSError as e:
            self.log.error("cannot stat the store %s: %s", self.config.store_dir, e.strerror)
            return interval
        limits = resolve_limits(self.config, fs)
        if limits is None:
            return interval
        if not limits.needs_gc(fs):
            return interval if limits.satisfied(fs) else interval / NEAR_FACTOR
        self.log.info(
            "free space %d MiB is below min-free %d MiB: collecting garbage",
            fs["free_bytes"] >> 20,
            limits.min_free >> 20,
        )
        self._worker = threading.Thread(target=self._gc_pass, name="gc", daemon=True)
        self._worker.start()
        return interval / NEAR_FACTOR

    def _gc_pass(self) -> None:
        result = self.gc.run("below min-free")
        if result is None:
            return  # someone else's pass (gc --now) is running; check again later
        self._log_result(result)
        if result.error:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        else:
            self._backoff = BACKOFF_FIRST

    def _log_result(self, result: GcResult) -> None:
        r = result.as_dict()
        if result.error:
            self.log.error("GC pass failed (retry in %.0f s): %s", self._backoff, result.error)
        else:
            self.log.log(
                logging.INFO,
                "GC pass (%s): deleted %d paths, freed %d MiB in %.1f s; %d MiB free",
                r["reason"],
                r["deleted"],
                r["bytes_freed"] >> 20,
                r["duration_seconds"] or 0,
                (r["free_after"] or 0) >> 20,
            )


def run_agent(config: AgentConfig, interval: float) -> int:
    """Entry point of `nixfarm agent`."""
    return Agent(config, interval).run()
