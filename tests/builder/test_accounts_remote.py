"""Per-client accounts on a real builder: builds from two clients through the gateway,
the agent service telling whose each one is, what each key may read back."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Client
from farm import Builder, Farm
from test_cli import nixfarm


def accounts(farm: Farm, client: str, b: Builder, *args: str) -> dict[str, Any]:
    result = farm.ssh(client, b, " ".join(["nixfarm accounts", *args]))
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def wait_for(
    what: str, check: Callable[[], bool], seconds: float = 30, show: Callable[[], object] = str
) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}: {show()}")
        time.sleep(0.3)


@pytest.mark.parametrize("builder_nix", ["2.8", "2.26"])
def test_builds_cpu_and_traffic_are_accounted_per_client(
    farm: Farm, client: Client, builder_nix: str
) -> None:
    alice, bob = farm.add_client("alice"), farm.add_client("bob")
    farm.add_client("watcher")
    clients = {"alice": "build", "bob": "build", "watcher": "metrics"}
    b = farm.add_builder("b1", clients=clients, nix=builder_nix)
    agent = farm.start_agent(b, "--interval", "1")

    # alice: a build that spins the CPU, over ssh-ng; while it runs, the builder lists it as hers.
    running: dict[str, Any] = {}

    def look_while_it_runs() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(running) < 2:
            for viewer in ("alice", "watcher"):
                result = farm.ssh(viewer, b, "nixfarm metrics --json")
                builds = (
                    json.loads(result.stdout)["builds"].get("running") if result.returncode == 0 else None
                )
                if builds:
                    running[viewer] = builds
            time.sleep(0.3)

    looker = threading.Thread(target=look_while_it_runs)
    looker.start()
    spun = client.build(b.machines_line(alice, "ssh-ng"), seconds=3, spin=300_000)
    looker.join()
    assert spun.returncode == 0, spun.stderr
    assert [r["client"] for r in running["alice"]] == ["alice"], running
    assert running["alice"][0]["name"].startswith("nixfarm-test-")
    assert [r["client"] for r in running["watcher"]] == ["(others)"]  # a metrics key: no names

    # bob: one build that succeeds and one that fails, over the legacy ssh:// protocol, both
    # over in milliseconds: far less than the agent's interval, and seen all the same.
    assert client.build(b.machines_line(bob, "ssh")).returncode == 0
    assert client.build(b.machines_line(bob, "ssh"), fail=1).returncode != 0

    def counts() -> dict[str, Any]:
        return accounts(farm, "alice", b)["clients"]

    wait_for(
        "alice's build finished, bob's two ended (one failed)",
        lambda: (
            counts().get("alice", {}).get("builds_finished") == 1
            and counts().get("bob", {}).get("builds_failed") == 1
            and counts().get("bob", {}).get("builds_finished") == 1
        ),
        show=counts,
    )
    seen = counts()
    assert seen["alice"]["builds_started"] == 1 and seen["bob"]["builds_started"] == 2
    assert seen["alice"]["builds_failed"] == 0
    assert seen["alice"]["build_seconds"] >= 2.5  # it slept 3 s, seen to a second
    assert seen["alice"]["cpu_seconds"] >= 0.1 > seen["bob"]["cpu_seconds"]  # only hers spun
    for name in ("alice", "bob"):
        assert seen[name]["received_bytes"] > 1000 and seen[name]["sent_bytes"] > 1000, seen[name]

    # A metrics key reads the accounts, but not whose they are.
    watched = accounts(farm, "watcher", b, "--since", "1h")["clients"]
    assert set(watched) <= {"(others)", "watcher"}
    assert watched["(others)"]["builds_started"] == 3

    # Kept across a restart of the agent.
    assert farm.stop_agent(b, agent) == 0
    farm.start_agent(b, "--interval", "1")
    again = accounts(farm, "bob", b)["clients"]
    for name in ("alice", "bob"):
        for counter in ("builds_started", "builds_finished", "builds_failed", "cpu_seconds"):
            assert again[name][counter] == seen[name][counter], (name, counter)
    assert Path(b.root, "state", "accounts.json").stat().st_mode & 0o777 == 0o644


def test_usage_and_builds_add_up_the_farm_and_name_a_builder_that_does_not_answer(
    farm: Farm, client: Client
) -> None:
    key = farm.add_client("alice")
    farm.add_client("bob")
    b1 = farm.add_builder("b1", clients={"alice": "build", "bob": "build"})
    b2 = farm.add_builder("b2", clients={"alice": "build", "bob": "build"})
    for b in (b1, b2):
        farm.start_agent(b, "--interval", "1")
    inventory = str(farm.write_inventory("alice", [b1, b2]))
    for b in (b1, b2, b1):
        assert client.build(b.machines_line(key, "ssh-ng")).returncode == 0

    # While a build runs, `nixfarm builds` lists it, asked of the builders with alice's key.
    slow = client.build_argv(b2.machines_line(key, "ssh-ng"), seconds=30)
    with subprocess.Popen(
        slow, env=client.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ) as build:
        try:

            def listed() -> list[Any]:
                result = nixfarm("builds", "--inventory", inventory, "--json")
                return list(json.loads(result.stdout)["builds"]) if result.returncode == 0 else []

            wait_for("the running build is listed", lambda: bool(listed()), show=listed)
            running = listed()
            assert [(r["builder"], r["client"]) for r in running] == [("b2", "alice")]
            assert running[0]["name"].startswith("nixfarm-test-") and running[0]["seconds"] >= 0
        finally:
            build.kill()

    def usage(*args: str) -> dict[str, Any]:
        result = nixfarm("usage", "--inventory", inventory, "--json", *args)
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    wait_for("three builds finished", lambda: usage()["rows"][0]["builds_finished"] == 3, show=usage)
    (alice,) = usage("--since", "1h")["rows"]
    assert (alice["client"], alice["builds_started"]) == ("alice", 4)  # with the one killed
    by_builder = {r["builder"]: r["builds_finished"] for r in usage("--by", "builder")["rows"]}
    assert by_builder == {"b1": 2, "b2": 1}

    # The table a person reads; then b2 goes down: named, with why, and exit 1.
    table = nixfarm("usage", "--inventory", inventory)
    assert table.returncode == 0 and "alice" in table.stdout and "farm usage by client" in table.stdout
    farm.stop_builder(b2)
    result = nixfarm("usage", "--inventory", inventory, "--json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert set(data["unavailable"]) == {"b2"} and "unreachable" in data["unavailable"]["b2"]
    assert data["rows"][0]["builds_finished"] == 2
    assert "nixfarm: b2: unreachable" in nixfarm("usage", "--inventory", inventory).stderr


PROMTOOL = "/var/cache/nixfarm-test/promtool/usr/bin/promtool"  # tests/run unpacks it


def test_the_agent_serves_prometheus_metrics_with_per_client_counters(farm: Farm, client: Client) -> None:
    key = farm.add_client("alice")
    b = farm.add_builder("b1", clients={"alice": "build"}, agent_config={"prometheus_listen": "0.0.0.0:9716"})
    farm.start_agent(b, "--interval", "1")
    assert client.build(b.machines_line(key, "ssh-ng")).returncode == 0
    url = f"http://{b.address}:9716/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return str(response.read().decode())

    wait_for(
        "alice's build is counted",
        lambda: 'nixfarm_client_builds_finished_total{client="alice"} 1' in scrape(),
    )
    text = scrape()
    check = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert 'nixfarm_client_builds_started_total{client="alice"} 1' in text
    assert "# TYPE nixfarm_client_sent_bytes_total counter" in text
    assert "nixfarm_store_free_bytes " in text
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://{b.address}:9716/nope", timeout=10)
    assert missing.value.code == 404


def test_a_user_without_the_key_gets_the_dispatcher_s_all_time_usage(farm: Farm, client: Client) -> None:
    from dispatcher import Dispatcher

    key = farm.add_client("alice")
    b = farm.add_builder("b1", clients={"alice": "build"})
    farm.start_agent(b, "--interval", "1")
    assert client.build(b.machines_line(key, "ssh-ng"), count=2).returncode == 0
    wait_for(
        "the builds are counted",
        lambda: accounts(farm, "alice", b)["clients"]["alice"]["builds_finished"] == 2,
    )
    dispatcher = Dispatcher(farm, [b])  # it asks for the accounts as soon as it is connected
    try:
        dispatcher.wait(
            "the accounts in the status", lambda: dispatcher.status()["b1"].get("accounts") is not None
        )
    finally:
        dispatcher.stop()
    # What a user of the client may read: the inventory and the status, not the key.
    shared = farm.root / "shared"  # (the farm's own directory is open to all, as /etc is)
    shared.mkdir(mode=0o755)
    shutil.copy(dispatcher.machines.parent / "dispatch-status.json", shared)
    shutil.copy(dispatcher.machines.parent / "inventory.json", shared)
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", farm.nixfarm, "usage"]
    where = ["--inventory", str(shared / "inventory.json"), "--machines", str(shared / "machines")]
    result = subprocess.run([*as_nobody, *where, "--json"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["rows"]
    assert (row["client"], row["builds_finished"]) == ("alice", 2)
    windowed = subprocess.run(
        [*as_nobody, *where, "--since", "1h"], capture_output=True, text=True, timeout=30
    )
    assert windowed.returncode == 2
    assert "--since asks the builders with" in windowed.stderr and "run as root" in windowed.stderr
