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


def test_a_build_key_s_demand_reaches_every_stream_and_ends_with_its_session(farm: Farm) -> None:
    """`demand N` on a stream's stdin is that client's builds waiting for a machine: every
    stream of the builder reports it (builds.demand_by_client) while the session lasts.
    Other input, and a metrics key's demand, are ignored."""
    for client in ("alice", "bob", "watcher"):
        farm.add_client(client)
    b = farm.add_builder("b1", clients={"alice": "build", "bob": "build", "watcher": "metrics"})
    farm.start_agent(b, "--interval", "1")  # it keeps the demand directory

    def stream(client: str) -> subprocess.Popen[str]:
        argv = [*farm.ssh_argv(client, b), "nixfarm stream --interval 0.3"]
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def next_demand(proc: subprocess.Popen[str], want: dict[str, int], seconds: float = 10) -> None:
        assert proc.stdout is not None
        deadline, seen = time.monotonic() + seconds, None
        while time.monotonic() < deadline:
            seen = json.loads(proc.stdout.readline())["builds"].get("demand_by_client")
            if seen == want:
                return
        raise AssertionError(f"demand_by_client is {seen}, not {want}")

    alice, bob, watcher = stream("alice"), stream("bob"), stream("watcher")
    try:
        for proc in (alice, bob, watcher):
            assert proc.stdin is not None
        assert alice.stdin and bob.stdin and watcher.stdin
        alice.stdin.write("demand 3\n")
        alice.stdin.write("x" * 100_000 + "\n")  # not ours: dropped whole
        alice.stdin.write("demand -1\ndemand 3.5\nrm -rf /\n")
        alice.stdin.flush()
        watcher.stdin.write("demand 50\n")  # a metrics key cannot build: not its word
        watcher.stdin.flush()
        next_demand(bob, {"alice": 3})
        bob.stdin.write("demand 0\n")  # bob has nothing waiting: he says so
        bob.stdin.flush()
        next_demand(alice, {"alice": 3, "bob": 0})
        # A metrics key sees the numbers, not whose they are (privacy.py).
        next_demand(watcher, {"(others)": 3})
        alice.stdin.close()  # alice's session ends: her word goes with it
        assert alice.wait(timeout=10) == 0
        next_demand(bob, {"bob": 0})
        next_demand(watcher, {"(others)": 0})
    finally:
        for proc in (alice, bob, watcher):
            proc.kill()
            proc.wait()
