"""`nixfarm stream`: snapshots, one JSON line each, for as long as the session lasts.

A dispatcher reads one stream per builder (dispatch.py). The stream reads
its stdin too: its end ends the stream, and a dispatcher sends requests on
it, each a line: `demand N`, its client's builds waiting for a machine
(demand.py), and `snapshots on-change`, a snapshot also soon after a build
session begins or ends on the builder (sessions.py), not only every
interval. Streams of agents that know neither ignore them.
"""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import time
from collections.abc import Callable

from . import demand
from .cli import report_warnings
from .config import AgentConfig
from .inotify import InotifyUnavailable
from .metrics import Collector
from .sessions import SessionEvents


def stdin_is_a_session() -> bool:
    """True if stdin is a pipe or socket, whose end means the session closed.

    /dev/null or a file is at its end at once and says nothing about the reader.
    """
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class Input:
    """The stream's stdin: its end ends the stream; its lines are the dispatcher's requests.

    Input is untrusted and bounded: lines over demand.MAX_LINE bytes are
    dropped, and the caller ignores lines it does not know.
    """

    def __init__(self, watch: bool) -> None:
        self.watch = watch
        self._partial = b""
        self._discarding = False  # inside a line too long to be ours, until its newline

    def wait(self, timeout: float, on_line: Callable[[bytes], None], also: int | None = None) -> str:
        """Wait up to `timeout` s for stdin, or for the file descriptor `also` to be readable.

        Returns "end" once a watched stdin reaches its end, "input" when lines
        came (each given to `on_line`), "also", or "timeout".
        """
        watched = ([0] if self.watch else []) + ([] if also is None else [also])
        if not watched:
            time.sleep(max(0.0, timeout))
            return "timeout"
        ready, _, _ = select.select(watched, [], [], max(0.0, timeout))
        if not ready:
            return "timeout"
        if also in ready:
            return "also"
        try:
            data = os.read(0, 4096)
        except OSError:
            return "end"
        if not data:
            return "end"
        *lines, self._partial = (self._partial + data).split(b"\n")
        if self._discarding and lines:
            lines, self._discarding = lines[1:], False  # the rest of a line too long to be ours
        if len(self._partial) > demand.MAX_LINE:
            self._partial, self._discarding = b"", True
        for line in lines:
            if len(line) <= demand.MAX_LINE:
                on_line(line.strip())
        return "input"


ON_CHANGE = b"snapshots on-change"  # a dispatcher's request: a snapshot also when a session begins or ends
SETTLE = 0.05  # s after a session event before its snapshot: the exec (or exit) is done, a burst is one
MIN_GAP = 0.1  # s between snapshots at least, however many sessions begin and end


class Stream:
    """What one `nixfarm stream` keeps: its metrics, its client's demand, its session watch."""

    def __init__(self, config: AgentConfig, client: str | None) -> None:
        self.config = config
        self.collector = Collector(config)
        self.kept = demand.ClientDemand(config.state_dir, client) if client else None
        self.sessions: SessionEvents | None = None  # once asked for
        self._asked = False

    def on_line(self, line: bytes) -> None:
        count = demand.parse_line(line)
        if count is not None:
            if self.kept:
                self.kept.set(count)
        elif line == ON_CHANGE and not self._asked:
            self._asked = True
            self._watch_sessions()

    def _watch_sessions(self) -> None:
        try:
            self.sessions = SessionEvents(self.config.state_dir)
        except (OSError, InotifyUnavailable) as e:
            self.collector.warnings.append(f"snapshots on change unavailable, every interval only: {e}")

    def line(self) -> bytes:
        if self.kept:
            self.kept.refresh()
            if self.kept.problem:
                self.collector.warnings.append(self.kept.problem)
        return json.dumps(self.collector.snapshot(), sort_keys=True).encode() + b"\n"

    def close(self) -> None:
        if self.kept:
            self.kept.remove()
        if self.sessions:
            self.sessions.close()
        self.collector.close()


def run_stream(
    config: AgentConfig, interval: float, count: int | None = None, client: str | None = None
) -> int:
    """`nixfarm stream`: a JSON line per interval until stdin closes or stdout breaks.

    With `client` (the gateway names it, for the build and admin roles), a
    `demand N` line on stdin is kept as that client's builds waiting for a
    machine (demand.py). A `snapshots on-change` line asks for a snapshot
    also soon after a build session begins or ends there (sessions.py).
    Other input is ignored.
    """
    # A session may also end with SIGHUP: that means "done", quietly. (SIGPIPE
    # stays ignored, as Python sets it, so a gone reader is a BrokenPipeError.)
    signal.signal(signal.SIGHUP, lambda *_: os._exit(0))
    stdin = Input(stdin_is_a_session())
    stream = Stream(config, client)
    deadline = time.monotonic() + config.stream_max_seconds
    sent = 0
    try:
        while True:
            try:
                os.write(1, stream.line())  # unbuffered: a reader sees each line at once
            except BrokenPipeError:
                return 0
            last = time.monotonic()
            report_warnings(stream.collector.take_warnings())
            sent += 1
            if count is not None and sent >= count:
                return 0
            if wait_for_next(stdin, stream, last, interval) == "end" or time.monotonic() >= deadline:
                return 0
    finally:
        stream.close()


def wait_for_next(stdin: Input, stream: Stream, last: float, interval: float) -> str:
    """Wait for the next snapshot: one interval after the `last`, or soon after a session
    began or ended, though never closer than MIN_GAP to the last (a busy builder's churn
    costs a stream at most 1/MIN_GAP snapshots a second). "end" when stdin ended."""
    due = last + interval
    while (left := due - time.monotonic()) > 0:
        sessions = stream.sessions
        outcome = stdin.wait(left, stream.on_line, sessions.fileno() if sessions else None)
        if outcome == "input":
            continue  # a request may have started the session watch
        if outcome != "also" or sessions is None:
            return outcome
        sessions.seen()  # taken: the coming snapshot shows them all
        due = min(due, max(time.monotonic() + SETTLE, last + MIN_GAP))
    return "timeout"
