"""Counting this client's builds that wait for a machine from the passes of real Nix's build hook,
Nix 2.8's and 2.26's (whose hook opens main-lock and every slot file per pass as 2.8's does)."""

from __future__ import annotations

import subprocess
import time

import pytest

from conftest import Client
from farm import Farm
from nix_root import NIX_VERSIONS
from nixfarm.client.passes import HookPasses
from nixfarm.client.slots import SlotHolds, flocked_inodes


@pytest.mark.parametrize("nix", NIX_VERSIONS)
def test_waiting_builds_are_counted_per_builder_and_taken_ones_are_not(farm: Farm, nix: str) -> None:
    key = farm.add_client("alice")
    b1, b2 = (farm.add_builder(n, clients={"alice": "build"}, max_jobs=2) for n in ("b1", "b2"))
    uris = [f"ssh-ng://nixfarm@{b.address}" for b in (b1, b2)]
    client = Client(farm.root, poll_interval=1, nix=nix)
    holds, passes = SlotHolds(client.current_load), HookPasses(client.current_load, window=2.0)
    machines = "\n".join(b.machines_line(key, max_jobs=2) for b in (b1, b2))
    accepted: list[float] = []  # when a hook took a slot, seen as the dispatcher sees it
    taken: set[str] = set()

    def waiting_after(seconds: float) -> list[int]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            now = time.monotonic()
            passes.read(now, holds.take_own_opens())
            locked = flocked_inodes()
            held = set().union(*(holds.taken_by_nix(u, 2, locked) for u in uris))
            accepted.extend([now] * len(held - taken))
            passes.took(now, len(held - taken))
            taken.clear()
            taken.update(held)
            time.sleep(0.05)
        return [passes.waiting(u, time.monotonic()) for u in uris]

    for uri in uris:
        holds.hold(uri, 2, 2)  # every slot held: Nix's hook postpones every build
    passes.watch(uris)
    proc = subprocess.Popen(client.build_argv(machines, count=3, seconds=3), env=client.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert waiting_after(3) == [3, 3]  # each pass looks at both builders
        holds.hold(uris[0], 2, 8)  # our own opens of the slot files are not Nix's passes
        assert waiting_after(0.5) == [3, 3]
        holds.hold(uris[0], 2, 1)  # one slot free on b1: the next round places a build there
        assert waiting_after(2.5) == [2, 2]
        assert len(accepted) == 1
        holds.release_all()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert waiting_after(2.5) == [0, 0]  # nothing waits any more: no passes
    finally:
        holds.release_all()
        passes.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
