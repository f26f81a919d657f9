"""Bytes received and sent on each client's SSH connections to this builder.

A connection is known as a client's from the first gateway session over it
(sessions.py): the session's nearest sshd ancestor holds the TCP socket.
The gateway records each session as it starts, and the agent maps it at once
(inotify on the sessions directory), so even a session of milliseconds, or a
connection shared by many sessions (ControlMaster), is known.

Its bytes (tcp_info's bytes_received and bytes_acked, from sock_diag) are
counted at every look, and once more when the kernel destroys the socket:
sock_diag broadcasts the final numbers to a listener allowed CAP_NET_ADMIN.
Without that permission the last interval of each connection is not counted.
Sockets are told apart by their cookie, which stays with a socket until it
is destroyed.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from . import attribution

DESTROY_GROUP = 1  # SKNLGRP_INET_TCP_DESTROY
MAX_CONNECTIONS = 65536


@dataclass
class Connection:
    client: str
    received: int  # counted so far
    sent: int


@dataclass
class Socket:
    cookie: int
    received: int
    sent: int


Counted = list[tuple[str, int, int]]  # (client, bytes received, bytes sent) to add


def tcp_sockets() -> dict[int, Socket]:
    """Every established TCP socket of this network namespace, by inode."""
    from pyroute2 import DiagSocket
    from pyroute2.netlink.diag import SS_ESTABLISHED

    out = {}
    with DiagSocket() as ds:
        ds.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for message in ds.get_sock_stats(family=family, states=1 << SS_ESTABLISHED, extensions=1 << 1):
                found = _socket(message)
                if found is not None and message["idiag_inode"]:
                    out[message["idiag_inode"]] = found
    return out


def _socket(message: Any) -> Socket | None:
    info = message.get_attr("INET_DIAG_INFO")  # tcp_info; absent for a socket in TIME_WAIT
    if info is None:
        return None
    # bytes_acked: sent and acknowledged, i.e. what reached the client.
    return Socket(message["idiag_cookie"], info["tcpi_bytes_received"], info["tcpi_bytes_acked"])


class TrafficMeter:
    """The clients' connections and what has been counted of each (not thread-safe: one lock)."""

    def __init__(self) -> None:
        self.connections: dict[int, Connection] = {}  # by socket cookie
        self._sessions: set[int] = set()  # the sessions mapped already

    def sessions_started(self, sessions: dict[int, str], baseline: bool = False) -> None:
        """Know the connections new sessions (PID -> client) run over as their clients'.

        `baseline`: they may be older than the agent; count only from now on.
        """
        new = {pid: client for pid, client in sessions.items() if pid not in self._sessions}
        self._sessions = set(sessions)
        if not new:
            return
        sockets = tcp_sockets()
        for pid, client in new.items():
            inode = attribution.connection_of(pid, sockets)
            if inode is None or len(self.connections) >= MAX_CONNECTIONS:
                continue
            found = sockets[inode]
            if found.cookie not in self.connections:
                start = (found.received, found.sent) if baseline else (0, 0)
                self.connections[found.cookie] = Connection(client, *start)

    def look(self) -> Counted:
        """The bytes since the last look; connections gone since are forgotten."""
        if not self.connections:
            return []
        by_cookie = {s.cookie: s for s in tcp_sockets().values()}
        counted = []
        for cookie in list(self.connections):
            now = by_cookie.get(cookie)
            if now is None:
                del self.connections[cookie]  # closed, its tail unseen (or seen by destroyed())
            else:
                counted.append(self._advance(self.connections[cookie], now))
        return [c for c in counted if c[1] or c[2]]

    def destroyed(self, message: Any) -> Counted:
        """A socket's last numbers, as sock_diag broadcast them when the kernel destroyed it."""
        final = _socket(message)
        if final is None or final.cookie not in self.connections:
            return []
        counted = self._advance(self.connections.pop(final.cookie), final)
        return [counted] if counted[1] or counted[2] else []

    @staticmethod
    def _advance(conn: Connection, now: Socket) -> tuple[str, int, int]:
        delta = (max(0, now.received - conn.received), max(0, now.sent - conn.sent))
        conn.received, conn.sent = max(conn.received, now.received), max(conn.sent, now.sent)
        return conn.client, *delta


def destroy_listener() -> Any:
    """A netlink socket told of every TCP socket the kernel destroys; OSError without CAP_NET_ADMIN."""
    from pyroute2 import DiagSocket

    listener = DiagSocket()
    try:
        listener.bind(groups=DESTROY_GROUP)
    except Exception:
        listener.close()
        raise
    return listener
