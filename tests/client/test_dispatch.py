"""`nixfarm dispatch` against real harness builders, real sshd and real nix-build."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import HERE, Client, NixPair
from dispatcher import BACKOFF, INTERVAL, KEEPALIVE, Dispatcher
from farm import Builder, Farm
from nix_root import NIX_VERSIONS
from nixfarm.common.atomic import write_atomic


@pytest.fixture(params=NIX_VERSIONS, ids=lambda v: f"builders{v}")
def three(farm: Farm, request: pytest.FixtureRequest) -> Iterator[tuple[list[Builder], Dispatcher]]:
    """Three builders on one Nix (2.8, then 2.26 with OpenSSH 10), listed by a dispatcher."""
    farm.add_client("alice")
    builders = [
        farm.add_builder(n, {"alice": "build"}, max_jobs=2, nix=request.param) for n in ("b1", "b2", "b3")
    ]
    dispatcher = Dispatcher(farm, builders)
    dispatcher.wait("all listed", lambda: dispatcher.listed() == {"b1", "b2", "b3"})
    yield builders, dispatcher
    dispatcher.stop()


def built_on(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr[-3000:]
    return [Path(p).read_text().split()[-1] for p in result.stdout.split()]


def test_builds_go_to_healthy_builders_only(three: tuple[list[Builder], Dispatcher], client: Client) -> None:
    (*_, b3), dispatcher = three
    b3.kill_sshd()
    dispatcher.wait("b3 leaves", lambda: "b3" not in dispatcher.listed())

    placed = built_on(client.build(f"@{dispatcher.machines}", count=6, seconds=1))

    assert set(placed) <= {"b1", "b2"} and len(placed) == 6
    assert dispatcher.status()["b3"]["state"] == "down"
    assert "connection refused" in dispatcher.status()["b3"]["reason"]


@pytest.mark.parametrize("how", ["sshd", "link"])
def test_a_dead_builder_leaves_in_time_and_comes_back(
    farm: Farm, three: tuple[list[Builder], Dispatcher], client: Client, how: str
) -> None:
    (*_, b3), dispatcher = three
    if how == "sshd":
        b3.kill_sshd()
    else:
        b3.set_link(up=False)

    left_after = dispatcher.wait("b3 leaves", lambda: "b3" not in dispatcher.listed())
    assert left_after <= 2 * INTERVAL + 3 * KEEPALIVE + 1  # 2 intervals + the keepalive timeout
    # A dead link is left out as a stalled stream at once, then the keepalives, turned on by
    # the stall, find it dead: a stall (2 intervals, checked every half interval), then 3
    # unanswered keepalives and the fourth's time.
    down_after = left_after + dispatcher.wait("b3 down", lambda: dispatcher.status()["b3"]["state"] == "down")
    assert down_after <= 2.5 * INTERVAL + 4 * KEEPALIVE + 2
    placed = built_on(client.build(f"@{dispatcher.machines}", count=4, seconds=1))
    assert "b3" not in placed

    failures = dispatcher.status()["b3"]["failures"]
    if how == "sshd":
        farm.restart_sshd(b3)
    else:
        b3.set_link(up=True)
    step = BACKOFF * 3 ** max(0, failures - 1) * 1.2  # the backoff step in force, with jitter
    back_after = dispatcher.wait("b3 returns", lambda: "b3" in dispatcher.listed(), timeout=step + 15)
    assert back_after <= step + 5  # one step, plus a connection and a first snapshot
    assert dispatcher.status()["b3"]["state"] == "healthy"


def test_a_full_store_that_does_not_recover_leaves_and_returns_after_gc(farm: Farm) -> None:
    farm.add_client("alice")
    farm.add_client("ops")
    good = farm.add_builder("good", clients={"alice": "build"})
    full = farm.add_builder("full", clients={"alice": "build", "ops": "admin"}, store_size="64m",
                            agent_config={"min_free": "16M", "max_free": "32M"})  # fmt: skip
    dispatcher = Dispatcher(farm, [good, full])
    try:
        dispatcher.wait("both listed", lambda: dispatcher.listed() == {"good", "full"})
        full.exec(["sh", "-c", "dd if=/dev/urandom of=/tmp/nf-fill-$$ bs=1M count=52 status=none; "
                   "nix-store --add /tmp/nf-fill-$$; rm /tmp/nf-fill-$$"])  # fmt: skip
        dispatcher.wait("full leaves", lambda: dispatcher.listed() == {"good"})
        assert dispatcher.status()["full"]["reason"].startswith("disk critical")

        farm.start_agent(full, "--interval", "1")  # its GC catches up
        dispatcher.wait("full returns", lambda: dispatcher.listed() == {"good", "full"})
        assert dispatcher.status()["full"]["state"] == "healthy"
    finally:
        dispatcher.stop()


def test_a_client_leaves_a_full_builder_to_the_client_using_it(farm: Farm, nix: NixPair) -> None:
    """One slot, two clients: while bob builds there, alice's dispatcher holds the slot
    back in her Nix's load accounting, and her waiting build goes when bob's ends."""
    farm.add_client("alice")
    bob_key = farm.add_client("bob")
    b = farm.add_builder("b1", clients={"alice": "build", "bob": "build"}, max_jobs=1, nix=nix.builder)
    farm.start_agent(b, "--interval", "1")  # it keeps the clients' demand (demand.py)
    client = Client(farm.root, poll_interval=1, nix=nix.client)
    dispatcher = Dispatcher(farm, [b], current_load=client.current_load)
    bob_store = f"local?root={farm.root / 'clients' / 'bob' / 'store'}"  # bob is another machine
    try:
        dispatcher.wait("b1 listed", lambda: dispatcher.listed() == {"b1"})
        bob_argv = client.build_argv(b.machines_line(bob_key, max_jobs=1), count=1, seconds=8)
        bob = subprocess.Popen([*bob_argv, "--store", bob_store], env=client.env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        dispatcher.wait("bob's build seen", lambda: dispatcher.status()["b1"]["held_back"] == 1)
        line = dispatcher.status()["b1"]["line"]
        assert line.split()[3] == "2"  # the file still lists the width (the inventory's max_jobs)
        alice = subprocess.Popen(client.build_argv(f"@{dispatcher.machines}", count=1, seconds=1),
                                 env=client.env(), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        end = time.monotonic() + 3
        while time.monotonic() < end:
            snap = dispatcher.status()["b1"]["snapshot"]
            assert snap["builds"]["sessions_by_client"].get("alice", 0) == 0, snap["builds"]
            assert alice.poll() is None
            time.sleep(0.2)
        # Her dispatcher counted the build waiting (her Nix's hook passes) and told the builder.
        dispatcher.wait("alice's demand reaches b1", lambda: dispatcher.status()["b1"]["waiting"] == 1)
        dispatcher.wait(
            "b1 reports it",
            lambda: dispatcher.status()["b1"]["snapshot"]["builds"].get("demand_by_client") == {"alice": 1},
        )
        _, bob_err = bob.communicate(timeout=60)
        alice_out, alice_err = alice.communicate(timeout=60)
        assert bob.returncode == 0, bob_err[-3000:]
        assert alice.returncode == 0, alice_err[-3000:]
        assert client.read(alice_out.strip()).split()[-1] == "b1"
        assert "waiting for a machine" in alice_err
    finally:
        dispatcher.stop()


def test_a_stopped_dispatcher_leaves_the_static_lines(farm: Farm) -> None:
    """Its own lines are as wide as the biggest builder and rely on the locks it holds,
    which end with it: it puts the inventory's static lines back as it stops."""
    farm.add_client("alice")
    b = farm.add_builder("b1", clients={"alice": "build"}, max_jobs=3)
    dispatcher = Dispatcher(farm, [b], static_max_jobs=1)
    dispatcher.wait("b1 listed", lambda: dispatcher.listed() == {"b1"})
    assert dispatcher.status()["b1"]["line"].split()[3] == "3"  # its capacity, as the snapshot says
    dispatcher.stop()
    header, line = dispatcher.machines.read_text().splitlines()
    assert header.startswith("# written by nixfarm dispatch as it stopped")
    assert line.split()[3:5] == ["1", "1"]  # the inventory's max_jobs and speed_factor


HOSTILE = {
    "garbage": "bad metrics: not ",  # not UTF-8 text / not JSON
    "truncated": "bad metrics: not JSON",
    "huge": "bad metrics: a line longer than 1048576 bytes",
    "stall": "stream stalled: no snapshot for",
    "schema": "bad metrics: schema version 99, this dispatcher reads 1",
}


def test_hostile_agents_are_degraded_and_the_others_keep_serving(farm: Farm, client: Client) -> None:
    key = farm.add_client("alice")
    pub = key.with_suffix(".pub").read_text().strip()
    good = farm.add_builder("good", clients={"alice": "build"}, max_jobs=2)
    hostile = []
    for mode in HOSTILE:
        b = farm.add_builder(mode, clients={"alice": "build"})
        line = f'restrict,command="{sys.executable} {HERE / "hostile_agent.py"} {mode}" {pub}\n'
        (b.root / "authorized_keys" / "nixfarm").write_text(line)
        hostile.append(b)
    dispatcher = Dispatcher(farm, [good, *hostile])
    try:
        for mode, reason in HOSTILE.items():
            dispatcher.wait(f"{mode} degraded", lambda m=mode: dispatcher.status()[m]["state"] == "degraded")
            assert dispatcher.status()[mode]["reason"].startswith(reason), dispatcher.status()[mode]
        status = dispatcher.status()
        assert status["good"]["state"] == "healthy"
        good_line = status["good"]["line"]
        assert good_line and good_line.split()[3] == "2"  # max-jobs 2, nothing running: all free
        # Bad metrics: listed with the static values (as stock Nix would list them).
        # A stall may be a dead link: left out until the keepalives decide.
        assert all(status[m]["line"] and status[m]["line"].split()[3] == "2" for m in HOSTILE if m != "stall")
        assert status["stall"]["line"] is None
        assert dispatcher.proc.poll() is None
    finally:
        dispatcher.stop()


def test_readers_never_see_a_partial_machines_file(tmp_path: Path) -> None:
    path = str(tmp_path / "machines")
    contents = [
        b"# written by nixfarm dispatch: 1 of 2 builders usable\n" + b"ssh-ng://a x 1 1 - - k\n",
        b"# written by nixfarm dispatch: 2 of 2 builders usable\n" + b"ssh-ng://a x 2 50 - - k\n" * 200,
    ]
    write_atomic(path, contents[0])
    done = threading.Event()

    def rewrite() -> None:
        i = 0
        while not done.is_set():
            write_atomic(path, contents[i % 2])
            i += 1

    writer = threading.Thread(target=rewrite)
    writer.start()
    seen = set()
    try:
        for _ in range(10_000):
            with open(path, "rb") as f:
                data = f.read()
            assert data in contents, f"a reader saw {len(data)} bytes that are neither version"
            seen.add(data)
    finally:
        done.set()
        writer.join()
    assert len(seen) == 2  # it really was rewritten while we read


def test_a_builder_stays_listed_while_its_agent_restarts(farm: Farm) -> None:
    """The agent serves the streams (relay.py): when it stops they end, cleanly. The dispatcher
    connects again at once, without counting a failure; the new stream takes its own snapshots
    until the agent is back, then hands itself over."""
    from farm import gateways_and_waiters

    farm.add_client("alice")
    b = farm.add_builder("b1", clients={"alice": "build"})
    agent = farm.start_agent(b, "--interval", "1")
    dispatcher = Dispatcher(farm, [b])
    try:
        dispatcher.wait("listed", lambda: dispatcher.listed() == {"b1"})
        dispatcher.wait("served by the agent", lambda: gateways_and_waiters(b) == (0, 1))
        assert farm.stop_agent(b, agent) == 0
        listed = []
        deadline = time.monotonic() + 4 * INTERVAL
        while time.monotonic() < deadline:
            listed.append(dispatcher.listed() == {"b1"})
            time.sleep(0.05)
        assert all(listed)
        assert gateways_and_waiters(b) == (1, 0)  # a stream of its own meanwhile
        farm.start_agent(b, "--interval", "1")
        dispatcher.wait("served by the agent again", lambda: gateways_and_waiters(b) == (0, 1))
        status = dispatcher.status()["b1"]
        assert status["state"] == "healthy" and status["failures"] == 0
        assert "connecting again" in dispatcher.log.read_text()
    finally:
        dispatcher.stop()
