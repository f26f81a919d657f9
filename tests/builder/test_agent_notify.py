"""`nixfarm agent` speaks sd_notify: READY=1 once a snapshot works, then watchdog pings.

systemd as PID 1 cannot run on this host, so a real AF_UNIX datagram socket
stands in for $NOTIFY_SOCKET here; the same code path runs under a real
systemd in the systemd-host tests and the NixOS VM tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

NIXFARM = str(Path(sys.executable).parent / "nixfarm")


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield sock, path
    sock.close()


def start_agent(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"store_dir": str(tmp_path), "state_dir": str(tmp_path)}))
    base = {
        k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    return subprocess.Popen(
        [NIXFARM, "--config", str(config), "agent", "--interval", "0.2"],
        env={**base, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def receive(sock: socket.socket, until: str, limit: int = 200) -> list[str]:
    messages = []
    for _ in range(limit):
        messages.append(sock.recv(4096).decode())
        if until in messages[-1]:
            return messages
    raise AssertionError(f"no {until!r} in {messages}")


def test_ready_then_watchdog_then_stopping(tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    agent = start_agent(tmp_path, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    try:
        before_ready = receive(sock, "READY=1")
        assert any(m.startswith("STATUS=store ") for m in before_ready)
        pings = []
        started = time.monotonic()
        while len(pings) < 5:
            pings += [m for m in receive(sock, "WATCHDOG=1") if m == "WATCHDOG=1"]
        # WatchdogSec=0.2 s asks for a ping at least every 0.1 s.
        assert time.monotonic() - started < 5
        agent.send_signal(signal.SIGTERM)
        receive(sock, "STOPPING=1")
        assert agent.wait(timeout=10) == 0
    finally:
        agent.kill()
        agent.wait()


def test_watchdog_for_another_pid_is_ignored(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    agent = start_agent(tmp_path, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    try:
        receive(sock, "READY=1")
        sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            while True:  # only STATUS changes may come; a ping would fail the test
                assert sock.recv(4096) != b"WATCHDOG=1"
    finally:
        agent.terminate()
        assert agent.wait(timeout=10) == 0


def test_outside_systemd_the_agent_runs_and_stops_cleanly(tmp_path: Path) -> None:
    agent = start_agent(tmp_path, {})
    time.sleep(0.5)
    assert agent.poll() is None, agent.stderr.read() if agent.stderr else ""
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=10) == 0
    assert agent.stderr is not None
    assert "Traceback" not in agent.stderr.read()
