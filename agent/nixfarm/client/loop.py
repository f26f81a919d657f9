"""The dispatcher's event loop: one that takes its connections' input in batches.

Three hundred builders' streams each send a snapshot at a moment of their
own. Woken for each one, the dispatcher paid a round of the loop (epoll,
its timers, the callbacks) 150 times a second for one packet each; taking
them in batches saved a fifth of its CPU (bench/README.md). This loop
looks at its connections at most once every `wake_every` s: a wake-up takes every
packet that came meanwhile. Timers are not delayed (a sleep never goes past
the loop's next one), so the dispatcher's polls of the hooks' slot locks
keep their pace; input waits at most `wake_every` s, against snapshots
that come every `interval` s.
"""

from __future__ import annotations

import asyncio
import selectors
import time


class BatchingSelector(selectors.DefaultSelector):
    """The platform's selector (epoll on Linux) that, woken less than `wake_every` s ago,
    sleeps the rest of it (or until the loop's next timer, if sooner) before it looks again."""

    def __init__(self, wake_every: float) -> None:
        super().__init__()
        self.wake_every = wake_every
        self._woke = float("-inf")

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        # timeout 0: the loop has callbacks ready and only polls; it must not sleep.
        if timeout is None or timeout > 0:
            rest = self._woke + self.wake_every - time.monotonic()
            if rest > 0:
                nap = rest if timeout is None else min(rest, timeout)
                time.sleep(nap)
                timeout = None if timeout is None else timeout - nap
        ready = super().select(timeout)
        self._woke = time.monotonic()
        return ready


def batching_loop(wake_every: float) -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop(BatchingSelector(wake_every))
