"""The dispatcher's event loop takes input in batches, and never delays a timer (nixfarm.client.loop)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from nixfarm.client import loop
from nixfarm.client.loop import BatchingSelector, batching_loop


class Clock:
    """loop.py's view of time: monotonic() is set by the test, sleep() only recorded."""

    def __init__(self) -> None:
        self.now = 100.0
        self.naps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.naps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(loop, "time", fake)
    return fake


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def woken_selector(clock: Clock, reader: socket.socket) -> BatchingSelector:
    """A selector watching `reader` that has just returned from a look (at clock.now)."""
    selector = BatchingSelector(wake_every=0.05)
    selector.register(reader, 1)  # EVENT_READ
    assert selector.select(0) == []
    return selector


def test_input_right_after_a_look_waits_out_the_rest_of_the_quantum(
    clock: Clock, pair: tuple[socket.socket, socket.socket]
) -> None:
    selector = woken_selector(clock, pair[0])
    clock.now += 0.02
    pair[1].send(b"x")
    ready = selector.select(None)
    assert [key.fileobj for key, _ in ready] == [pair[0]]
    assert clock.naps == [pytest.approx(0.03)]
    selector.close()


def test_a_timer_sooner_than_the_quantum_is_not_delayed(
    clock: Clock, pair: tuple[socket.socket, socket.socket]
) -> None:
    selector = woken_selector(clock, pair[0])
    started = time.monotonic()
    # The loop's next timer is due in 10 ms: it sleeps 10 ms, then only polls (nothing came).
    assert selector.select(0.01) == []
    assert clock.naps == [pytest.approx(0.01)]
    assert time.monotonic() - started < 1.0  # the poll did not block for a timeout left over
    selector.close()


def test_no_nap_when_the_loop_only_polls_or_the_quantum_is_over(
    clock: Clock, pair: tuple[socket.socket, socket.socket]
) -> None:
    selector = woken_selector(clock, pair[0])
    pair[1].send(b"x")
    assert len(selector.select(0)) == 1  # callbacks are ready: the loop must go on at once
    clock.now += 0.06
    assert len(selector.select(None)) == 1
    assert clock.naps == []
    selector.close()


def test_a_loop_on_it_reads_many_packets_per_wake_up(pair: tuple[socket.socket, socket.socket]) -> None:
    """Real time: a writer sends 300 packets over ~0.3 s; the loop reads them in few wake-ups."""
    reader, writer = pair
    reader.setblocking(False)
    wake_ups, received, took = 0, 0, 0.0

    def write() -> None:
        for _ in range(300):
            writer.send(b"x")
            time.sleep(0.001)
        writer.send(b"!")

    async def main() -> None:
        nonlocal took
        done = asyncio.get_running_loop().create_future()

        def readable() -> None:
            nonlocal wake_ups, received
            wake_ups += 1
            data = reader.recv(4096)
            received += data.count(b"x")
            if data.endswith(b"!"):
                done.set_result(None)

        asyncio.get_running_loop().add_reader(reader, readable)
        thread = threading.Thread(target=write)
        started = time.monotonic()
        thread.start()
        await asyncio.wait_for(done, 30)
        took = time.monotonic() - started
        thread.join()

    with asyncio.Runner(loop_factory=lambda: batching_loop(0.05)) as runner:
        runner.run(main())
    assert received == 300
    # Woken for each packet, it would have read ~300 times; at most once per 50 ms of the
    # writing here (plus the first packet, read at once), however long the writing took.
    assert wake_ups <= took / 0.05 + 2, (wake_ups, took)
