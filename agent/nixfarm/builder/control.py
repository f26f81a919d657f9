"""The agent's control socket: how `nixfarm gc --now / --dry-run` reach the root agent.

Only the agent (root) deletes store paths. The gateway's admin role runs as
the builder user, so it asks the agent over a Unix socket in the state
directory (mode 0660, group `control_group`). One request per connection:
a JSON line {"command": ...}; the answer is JSON lines, progress events and
then one final event ("done", "busy" or "error"). Requests are bounded in
size and time.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from ..common.errors import NixfarmError

SOCKET_NAME = "control.sock"
MAX_REQUEST = 4096
REQUEST_TIMEOUT = 5.0
FINAL_EVENTS = ("done", "busy", "error")

Send = Callable[[dict[str, Any]], None]
Handler = Callable[[dict[str, Any], Send], None]


class AgentUnavailable(NixfarmError):
    """No agent answers on the control socket."""


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


def listen_unix(path: str, group: str, backlog: int) -> socket.socket:
    """A listening Unix socket at `path` for root and `group` only (root only without one).

    KeyError if there is no such group.
    """
    if os.path.exists(path):
        os.unlink(path)  # left by an agent that did not stop cleanly
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o117)  # never world-accessible, not even for a moment
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    if group:
        os.chown(path, 0, grp.getgrnam(group).gr_gid)
    os.chmod(path, 0o660 if group else 0o600)
    sock.listen(backlog)
    return sock


class ControlServer:
    """Accepts requests in a background thread and hands each to `handler`."""

    def __init__(self, path: str, group: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.sock = listen_unix(path, group, 8)
        threading.Thread(target=self._accept, name="control", daemon=True).start()

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(REQUEST_TIMEOUT)
            try:
                request = _read_request(conn)
            except (OSError, ValueError) as e:
                _send(conn, {"event": "error", "message": f"bad request: {e}"})
                return
            conn.settimeout(None)  # a GC pass may take a while; the client decides how long to wait
            # If the client goes away, the work itself carries on.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.handler(request, lambda event: _send(conn, event))


def _read_request(conn: socket.socket) -> dict[str, Any]:
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(MAX_REQUEST)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError(f"longer than {MAX_REQUEST} bytes")
    request = json.loads(data.split(b"\n", 1)[0] or b"null")
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        raise ValueError('expected {"command": ...}')
    return request


def _send(conn: socket.socket, event: dict[str, Any]) -> None:
    conn.sendall(json.dumps(event).encode() + b"\n")


def request(
    path: str,
    command: dict[str, Any],
    on_event: Callable[[dict[str, Any]], None],
    timeout: float = 3600,
) -> dict[str, Any]:
    """Send one request; call `on_event` for each event; return the final one."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise AgentUnavailable(f"the nixfarm agent is not running (nothing answers on {path})") from None
    except PermissionError:
        sock.close()
        raise AgentUnavailable(f"not allowed to use {path} (see the agent's control_group)") from None
    with sock, sock.makefile("rb") as answers:
        sock.sendall(json.dumps(command).encode() + b"\n")
        for line in answers:
            event = json.loads(line)
            on_event(event)
            if event.get("event") in FINAL_EVENTS:
                return event
    raise AgentUnavailable("the agent closed the connection without an answer")
