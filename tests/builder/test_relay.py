"""The agent's stream server (relay.py) with real sockets and pipes in place of an SSH session."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

import pytest

from nixfarm.builder import relay


@pytest.fixture
def server(tmp_path: Path) -> relay.StreamServer:
    s = relay.StreamServer(relay.socket_path(str(tmp_path)), "", 1.0, max_streams=2, max_seconds=60)
    yield s
    s.close()


def session(tmp_path: Path, interval: float, client: str | None, waiting: int | None = None):  # type: ignore[no-untyped-def]
    """Hand a fresh pipe pair over as a stream's stdin and stdout, as the gateway's process would
    its own fds 0 and 1; returns (connection or None, our end of stdin, our end of stdout)."""
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    saved = os.dup(0), os.dup(1)
    os.dup2(stdin_r, 0)
    os.dup2(stdout_w, 1)
    try:
        conn = relay.hand_over(str(tmp_path), interval, client, None, 30.0, waiting)
    finally:
        os.dup2(saved[0], 0)
        os.dup2(saved[1], 1)
        for fd in (*saved, stdin_r, stdout_w):
            os.close(fd)
    return conn, stdin_w, stdout_r


def line(fd: int, timeout: float = 5) -> bytes:
    assert select.select([fd], [], [], timeout)[0], "no line"
    return os.read(fd, 65536)


def test_a_handed_over_stream_gets_each_snapshot_and_ends_with_its_input(
    tmp_path: Path, server: relay.StreamServer
) -> None:
    server.publish(b'{"n": 1}\n')
    conn, stdin, stdout = session(tmp_path, 1.0, "alice", waiting=2)
    assert conn is not None
    assert line(stdout) == b'{"n": 1}\n'  # the latest at once
    assert server.demand == {"alice": 2}  # what the stream was told before it handed over
    os.write(stdin, b"demand 5\n" + b"x" * 200 + b"\ndemand 7\n")
    server.publish(b'{"n": 2}\n')  # too soon after the last: an interval less half a snapshot's
    time.sleep(0.6)
    server.publish(b'{"n": 3}\n')
    assert line(stdout) == b'{"n": 3}\n'
    assert server.demand == {"alice": 7}
    os.close(stdin)  # the session ends
    assert conn.recv(16) == b""  # the agent closed it: the waiting `cat` ends
    assert server.demand == {} and server.count() == 0
    conn.close()
    os.close(stdout)


def test_short_intervals_bad_names_and_too_many_streams_are_refused(
    tmp_path: Path, server: relay.StreamServer
) -> None:
    assert session(tmp_path, 0.5, None)[0] is None  # faster than the agent's snapshots
    assert session(tmp_path, 2.0, "x; rm -rf /")[0] is None
    kept = [session(tmp_path, 2.0, None) for _ in range(2)]
    assert all(conn is not None for conn, _, _ in kept)
    assert session(tmp_path, 2.0, None)[0] is None  # max_streams
    for conn, stdin, stdout in kept:
        assert conn is not None
        conn.close()
        os.close(stdin)
        os.close(stdout)
