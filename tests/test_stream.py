"""`nixfarm stream` over SSH: a line per interval, and gone as soon as the session is."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from farm import Builder, Farm


def stream_processes(builder: Builder) -> list[str]:
    return [cmd for _, cmd in builder.processes() if "nixfarm gateway" in cmd]


def wait_until_gone(builder: Builder, seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    left = stream_processes(builder)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = stream_processes(builder)
    return left


def open_stream(farm: Farm, builder: Builder) -> subprocess.Popen[str]:
    argv = [*farm.ssh_argv("watcher", builder), "nixfarm stream --interval 0.3"]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    lines = [json.loads(proc.stdout.readline()) for _ in range(3)]
    assert [snap["schema"] for snap in lines] == [1, 1, 1]
    assert lines[0]["timestamp"] < lines[1]["timestamp"] < lines[2]["timestamp"]
    assert lines[2]["network"]["rx_bytes_per_second"] is not None  # rates need two reads
    assert stream_processes(builder), "the stream should be running on the builder"
    return proc


@pytest.fixture
def builder(farm: Farm) -> Builder:
    farm.add_client("watcher")
    return farm.add_builder("b1", clients={"watcher": "metrics"})


def test_stream_exits_0_when_the_client_closes_the_session(farm: Farm, builder: Builder) -> None:
    proc = open_stream(farm, builder)
    assert proc.stdin is not None
    proc.stdin.close()  # ssh sends EOF: the session is over

    started = time.monotonic()
    assert proc.wait(timeout=10) == 0, proc.stderr.read() if proc.stderr else ""
    assert time.monotonic() - started < 2
    assert wait_until_gone(builder, 2) == []
    assert proc.stderr is not None and proc.stderr.read() == ""


def test_stream_leaves_nothing_behind_when_the_client_dies(farm: Farm, builder: Builder) -> None:
    proc = open_stream(farm, builder)

    proc.send_signal(signal.SIGKILL)  # no EOF, no goodbye: the TCP connection just closes
    proc.wait(timeout=10)

    assert wait_until_gone(builder, 2) == []
