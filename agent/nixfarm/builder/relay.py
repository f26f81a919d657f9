"""One snapshot per builder per interval, however many clients stream it.

Each client's dispatcher holds a `nixfarm stream` session on every builder.
Were each stream a Python process taking its own snapshots, a builder would
pay a process (~3 MiB PSS at the least, ~20 MiB with the collector) and a
/proc walk per client. Instead the agent service takes one snapshot per
`snapshot_interval` and serves every stream from it:

1. The stream (the gateway, as the builder user) connects to the agent's
   socket `state_dir/stream.sock` (0660, group `control_group`), sends one
   JSON line (interval, the client it may speak for, how long and how many
   lines) with its SSH session's stdin and stdout attached (SCM_RIGHTS),
   and waits for "ok".
2. The agent writes the snapshot lines to that stdout and reads the
   client's `demand N` lines from that stdin (demand.Lines), in one thread
   for all streams.
3. sshd keeps a session open while its command runs, so the stream execs
   `cat` with the socket as its stdin: a tiny process that ends when the
   agent closes the socket (the session ended, or the agent stopped), and
   with it the session, exit code 0, as a stream always ended.

Where no agent answers, or it refuses (an interval shorter than its
snapshots', too many streams), the stream takes its own snapshots as
before, and hands itself over as soon as an agent answers.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import selectors
import socket
import threading
import time

from ..common.names import NAME
from ..common.privacy import snapshot_for
from ..common.snapshot import is_count
from .control import listen_unix
from .demand import Lines

TYPE_CHECKING = False  # see cli.py: this runs in every stream session
if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import AgentConfig

SOCKET_NAME = "stream.sock"
MAX_REQUEST = 1024  # bytes of a hand-over request
HAND_OVER_TIMEOUT = 2.0  # seconds the agent gets to answer one
MAX_BEHIND = 1 << 20  # bytes a slow reader may be behind before its stream is dropped
# Where the waiting `cat` is looked for (fixed, like the gateway's Nix programs: not PATH).
WAITER_PATH = ("/run/current-system/sw/bin", "/usr/bin", "/bin")


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


# -- the stream's side ---------------------------------------------------------


def waiter() -> str | None:
    """The `cat` that holds the session open for the agent, or None."""
    for d in WAITER_PATH:
        path = os.path.join(d, "cat")
        if os.access(path, os.X_OK):
            return path
    return None


def hand_over(
    state_dir: str,
    interval: float,
    client: str | None,
    count: int | None,
    seconds: float,
    waiting: int | None = None,
    viewer: str | None = None,
) -> socket.socket | None:
    """Give this session's stdin and stdout to the agent; the connection if it took them.

    `client` is who may say `demand N` on this stream (None: nobody), and
    `waiting` what it said last; `viewer`, if given, the only client whose
    name the stream may show (privacy.py); the agent ends the stream after
    `count` lines or `seconds`. The caller then calls wait_for_agent(); on None it
    streams by itself.
    """
    path = socket_path(state_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(HAND_OVER_TIMEOUT)
    try:
        sock.connect(path)
        request = {
            "interval": interval,
            "client": client,
            "count": count,
            "seconds": seconds,
            "waiting": waiting,
            "viewer": viewer,
        }
        fds = array.array("i", [0, 1])
        sock.sendmsg([json.dumps(request).encode() + b"\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        answer = sock.recv(256)
    except OSError:
        sock.close()
        return None
    if answer != b"ok\n":
        sock.close()
        return None
    return sock


def wait_for_agent(sock: socket.socket, cat: str) -> None:
    """Exec `cat` reading the agent's connection: the session lasts as long as the agent
    serves it, and this Python process goes away. Never returns."""
    devnull = os.open(os.devnull, os.O_RDWR)
    sock.setblocking(True)  # the timeout made it non-blocking, and `cat` would see EAGAIN
    os.dup2(sock.fileno(), 0)  # the agent has the session's stdin: ours is its connection now
    os.dup2(devnull, 1)  # and its stdout: ours must not keep the session's open
    os.execv(cat, ["cat"])  # noqa: S606 - a fixed program, no shell, no client input


# -- the agent's side ----------------------------------------------------------


class _Stream:
    """One client's stream, served by the agent."""

    def __init__(
        self,
        conn: socket.socket,
        stdin: int,
        stdout: int,
        request: dict[str, object],
        now: float,
        max_seconds: float,
    ) -> None:
        self.conn, self.stdin, self.stdout = conn, stdin, stdout
        self.interval = float(request["interval"])  # type: ignore[arg-type]
        client = request.get("client")
        self.client = client if isinstance(client, str) else None
        viewer = request.get("viewer")
        self.viewer = viewer if isinstance(viewer, str) else None
        count = request.get("count")
        self.left = count if isinstance(count, int) and count > 0 else None
        self.ends = now + min(float(request["seconds"]), max_seconds)  # type: ignore[arg-type]
        self.lines = Lines()
        self.sent_at: float | None = None
        self.behind = b""  # the part of a line a full pipe did not take yet


class StreamServer:
    """Serves every handed-over stream from the snapshots `publish()` is given, in one thread."""

    def __init__(
        self, path: str, group: str, snapshot_interval: float, max_streams: int, max_seconds: float
    ) -> None:
        self.path = path
        self.max_seconds = max_seconds  # the longest a stream runs (the config's stream_max_seconds)
        self.snapshot_interval = snapshot_interval
        self.max_streams = max_streams
        self.demand: dict[str, int] = {}  # the live streams' clients' counts (replaced, never changed)
        self.problems: list[str] = []  # unexpected errors, for the agent to log
        self._latest = b""
        self._current: tuple[bytes, dict[str, bytes]] = (b"", {})
        self._streams: dict[int, _Stream] = {}  # by its connection's fd
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self.sock = listen_unix(path, group, 64)
        self.sock.setblocking(False)
        self._selector.register(self.sock, selectors.EVENT_READ, self._accept)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._woken)
        self._thread = threading.Thread(target=self._run, name="streams", daemon=True)
        self._thread.start()

    def publish(self, line: bytes) -> None:
        """A new snapshot (one JSON line): streams that are due get it."""
        # The line and its masked copies together, replaced at once: the serving thread
        # must never pair a new line with the copies of an old one.
        self._current = (line, {})
        self._latest = line
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"s")

    def count(self) -> int:
        return len(self._streams)

    def close(self) -> None:
        """End every stream (their sessions end, exit code 0) and stop."""
        self._stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select(timeout=1.0):
                try:
                    key.data(key)
                except Exception as e:  # one stream's trouble must not stop the others
                    self.problems.append(f"stream server: {type(e).__name__}: {e}")
        for stream in list(self._streams.values()):
            self._end(stream)
        self.sock.close()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _woken(self, _key: selectors.SelectorKey) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        now = time.monotonic()
        # Sent when at least an interval less half a snapshot interval has passed:
        # snapshots come every snapshot_interval give or take a little, and a stream of
        # the same interval must get every one of them, not every other.
        slack = self.snapshot_interval / 2
        for stream in list(self._streams.values()):
            if now >= stream.ends:
                self._end(stream)
            elif stream.sent_at is None or now - stream.sent_at >= stream.interval - slack:
                self._send(stream, now)

    def _accept(self, _key: selectors.SelectorKey) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        conn.settimeout(HAND_OVER_TIMEOUT)  # a stream that does not say what it wants is dropped
        fds: list[int] = []
        try:
            data, ancillary, _, _ = conn.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(2 * 4))
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += array.array("i", payload[: len(payload) - len(payload) % 4]).tolist()
            refusal = self._refusal(data, fds)
            if refusal:
                conn.sendall(f"no: {refusal}\n".encode())
                raise OSError(refusal)
            request = json.loads(data)
            stream = _Stream(conn, fds[0], fds[1], request, time.monotonic(), self.max_seconds)
            conn.sendall(b"ok\n")
        except (OSError, ValueError):
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        os.set_blocking(stream.stdin, False)
        os.set_blocking(stream.stdout, False)  # a reader that does not read must not stop the others
        conn.setblocking(False)
        self._streams[conn.fileno()] = stream
        self._selector.register(conn, selectors.EVENT_READ, lambda _: self._end(stream))
        self._selector.register(stream.stdin, selectors.EVENT_READ, lambda _: self._read(stream))
        waiting = request.get("waiting")
        if stream.client and is_count(waiting):
            self.demand = {**self.demand, stream.client: waiting}
        if self._latest:
            self._send(stream, time.monotonic())

    def _refusal(self, data: bytes, fds: list[int]) -> str:
        """Why a hand-over is refused ("" if it is taken)."""
        if len(fds) != 2:
            return "expected the session's stdin and stdout"
        try:
            request = json.loads(data)
            interval, seconds = float(request["interval"]), float(request["seconds"])
        except (ValueError, KeyError, TypeError):
            return "not a stream request"
        if not self.snapshot_interval <= interval <= 86400 or not seconds > 0:
            return f"interval {interval:g} s: this agent takes a snapshot every {self.snapshot_interval:g} s"
        for key in ("client", "viewer"):
            name = request.get(key)
            if name is not None and not (isinstance(name, str) and NAME.fullmatch(name)):
                return f"{key}: not a client name"
        if len(self._streams) >= self.max_streams:
            return f"serving {len(self._streams)} streams already"
        return ""

    def _read(self, stream: _Stream) -> None:
        """The client's input: `demand N` lines from a client that may build; its end ends the stream."""
        try:
            data = os.read(stream.stdin, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._end(stream)
            return
        counts = stream.lines.feed(data)
        if counts and stream.client:
            self.demand = {**self.demand, stream.client: counts[-1]}

    def _send(self, stream: _Stream, now: float) -> None:
        stream.sent_at = now
        try:
            if stream.behind:  # finish the line a full pipe cut, or skip this snapshot
                stream.behind = stream.behind[os.write(stream.stdout, stream.behind) :]
                if stream.behind:
                    return
            line = self._line_for(stream.viewer)
            written = os.write(stream.stdout, line)
        except BlockingIOError:
            return  # the reader is behind: it gets the next snapshot
        except OSError:
            self._end(stream)  # the session is gone
            return
        stream.behind = line[written:]
        if len(stream.behind) > MAX_BEHIND:
            self._end(stream)
        if stream.left is not None:
            stream.left -= 1
            if stream.left <= 0:
                self._end(stream)

    def _line_for(self, viewer: str | None) -> bytes:
        """The latest snapshot as `viewer` may see it: other clients' names hidden (privacy.py),
        worked out once per snapshot and viewer."""
        latest, masked = self._current
        if viewer is None:
            return latest
        if viewer not in masked:
            seen = snapshot_for(json.loads(latest), viewer)
            masked[viewer] = json.dumps(seen, sort_keys=True).encode() + b"\n"
        return masked[viewer]

    def _end(self, stream: _Stream) -> None:
        if self._streams.pop(stream.conn.fileno(), None) is None:
            return
        self._selector.unregister(stream.conn)
        self._selector.unregister(stream.stdin)
        if stream.client and not any(s.client == stream.client for s in self._streams.values()):
            self.demand = {k: v for k, v in self.demand.items() if k != stream.client}
        for fd in (stream.stdin, stream.stdout):
            with contextlib.suppress(OSError):
                os.close(fd)
        stream.conn.close()  # its `cat` reads the end: it exits, and sshd ends the session


def start_server(config: AgentConfig, warn: Callable[[str], None]) -> StreamServer | None:
    """The agent's stream server, or None (with a warning) where it cannot run."""
    import resource

    # Each stream holds three descriptors (stdin, stdout, its connection).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    max_streams = max(0, min(hard, 1 << 20) - 256) // 3
    path = socket_path(config.state_dir)
    try:
        return StreamServer(
            path, config.control_group, config.snapshot_interval, max_streams, config.stream_max_seconds
        )
    except (OSError, KeyError) as e:  # KeyError: no such group
        warn(f"cannot serve streams from {path} (each stream takes its own snapshots): {e}")
        return None
