"""Metrics read over SSH through the gateway tell the truth about each builder."""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from conftest import Client
from farm import Builder, Farm, memory_cgroup_kind

MiB = 1 << 20


def remote_metrics(farm: Farm, client: str, builder: Builder) -> dict[str, Any]:
    result = farm.ssh(client, builder, "nixfarm metrics --json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_active_builds_counts_real_builds_on_that_builder_only(farm: Farm, client: Client) -> None:
    key = farm.add_client("alice")
    farm.add_client("watcher")
    roles = {"alice": "build", "watcher": "metrics"}
    b1, b2, b3 = (farm.add_builder(n, clients=roles) for n in ("b1", "b2", "b3"))
    assert remote_metrics(farm, "watcher", b1)["builds"]["active"] == 0

    build = subprocess.Popen(
        client.build_argv(b1.machines_line(key, max_jobs=2), count=2, seconds=3),
        env=client.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and build.poll() is None:
            seen.append(remote_metrics(farm, "watcher", b1)["builds"]["active"])
            if seen[-1] == 2:
                break
        assert seen and seen[-1] == 2, f"active builds seen on b1: {seen}"
        assert remote_metrics(farm, "watcher", b2)["builds"]["active"] == 0
        assert remote_metrics(farm, "watcher", b3)["builds"]["active"] == 0
    finally:
        _, stderr = build.communicate(timeout=60)
    assert build.returncode == 0, stderr
    assert remote_metrics(farm, "watcher", b1)["builds"]["active"] == 0


def test_stream_reports_ages_of_running_builds_and_durations_of_finished_ones(
    farm: Farm, client: Client
) -> None:
    """What the dispatcher's look-ahead reads (dispatch.ending_soon), from real builds."""
    key = farm.add_client("alice")
    farm.add_client("watcher")
    b1 = farm.add_builder("b1", clients={"alice": "build", "watcher": "metrics"})
    client.build(b1.machines_line(key), kib=1)  # the store's first build: not the one measured
    stream = subprocess.Popen(
        [*farm.ssh_argv("watcher", b1), "nixfarm stream --interval 0.5"],
        stdin=subprocess.PIPE,  # the stream ends when its stdin closes
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert stream.stdout is not None
        line = stream.stdout.readline()
        assert line, stream.communicate(timeout=10)[1]
        first = json.loads(line)["builds"]
        assert first["ages_seconds"] == [] and first["finished"] == []
        build = client.build_argv(b1.machines_line(key, max_jobs=2), count=2, seconds=3)
        subprocess.run(build, env=client.env(), check=True, capture_output=True, timeout=60)
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            seen.append(json.loads(stream.stdout.readline())["builds"])
            if len(seen[-1]["finished"]) >= 2:
                break
    finally:
        stream.kill()
        stream.wait()
    ran = [builds["ages_seconds"] for builds in seen if builds["ages_seconds"]]
    assert not seen[-1]["ages_seconds"], seen[-1]
    # Each build held its slot for 3 s; seen every 0.5 s, its end is known to +-0.25 s.
    took = [t for _, t in seen[-1]["finished"]]
    assert len(took) == 2 and all(2.7 <= t <= 4.5 for t in took), took
    # Read at once: both ended within the last second or so (what ending_soon counts).
    assert all(0 <= ago <= 1.5 for ago, _ in seen[-1]["finished"]), seen[-1]["finished"]
    assert any(len(ages) == 2 for ages in ran), ran  # both ran at once, each seen with its age
    assert all(0 <= age <= 4.5 for ages in ran for age in ages), ran


def test_the_agent_service_keeps_finished_builds_for_later_streams(farm: Farm, client: Client) -> None:
    key = farm.add_client("alice")
    farm.add_client("watcher")
    roles = {"alice": "build", "watcher": "metrics"}
    b1 = farm.add_builder("b1", clients=roles, agent_config={"min_free": 0})
    assert remote_metrics(farm, "watcher", b1)["builds"]["finished"] == []
    agent = farm.start_agent(b1, "--interval", "1")
    try:
        result = client.build(b1.machines_line(key), seconds=2)
        assert result.returncode == 0, result.stderr
        took: list[float] = []
        deadline = time.monotonic() + 5
        while not took and time.monotonic() < deadline:  # the agent looks every second
            took = [t for _, t in remote_metrics(farm, "watcher", b1)["builds"]["finished"]]
    finally:
        assert farm.stop_agent(b1, agent) == 0
    # One call, no stream of its own: what it reports is the agent's record. The build
    # slept 2 s; the agent looks every second, so its end is known to +-0.5 s.
    assert len(took) == 1 and 1.5 <= took[0] <= 3.5, took


def test_free_bytes_fall_by_the_size_of_a_new_path(farm: Farm, client: Client) -> None:
    key = farm.add_client("alice")
    b1 = farm.add_builder("b1", clients={"alice": "build"}, store_size="64m")
    client.build(b1.machines_line(key), kib=1)  # first build creates the store's database
    before = remote_metrics(farm, "alice", b1)["store"]

    result = client.build(b1.machines_line(key), kib=4096)

    assert result.returncode == 0, result.stderr
    after = remote_metrics(farm, "alice", b1)["store"]
    assert before["total_bytes"] == after["total_bytes"] == 64 * MiB
    fallen = before["free_bytes"] - after["free_bytes"]
    # 4 MiB of output plus its .drv and a few database pages.
    assert 4 * MiB <= fallen <= 4 * MiB + 512 * 1024, f"free bytes fell by {fallen}"
    assert after["free_inodes"] < before["free_inodes"]


def test_daemon_memory_cap_on_the_builders_cgroup_is_reported(farm: Farm) -> None:
    farm.add_client("watcher")
    capped = farm.add_builder("capped", clients={"watcher": "metrics"}, memory_max=300 * MiB)
    free = farm.add_builder("free", clients={"watcher": "metrics"})

    snap = remote_metrics(farm, "watcher", capped)
    assert snap["hostname"] == "capped"
    mem = snap["nix_daemon_memory"]
    assert mem["error"] is None
    assert mem["source"] == {"v1": "cgroup1", "v2": "cgroup2"}[memory_cgroup_kind()]
    assert mem["cgroup"] == "/" + os.path.basename(capped.cgroup)
    assert mem["max_bytes"] == 300 * MiB
    assert 0 < mem["current_bytes"] < 300 * MiB
    assert mem["oom_kills"] == 0

    assert remote_metrics(farm, "watcher", free)["nix_daemon_memory"]["max_bytes"] is None


def test_unreadable_cgroup_file_gives_one_warning_line_not_a_traceback(farm: Farm) -> None:
    farm.add_client("watcher")
    b1 = farm.add_builder("b1", clients={"watcher": "metrics"}, memory_max=300 * MiB)
    limit_file = "memory.limit_in_bytes" if memory_cgroup_kind() == "v1" else "memory.max"
    os.chmod(os.path.join(b1.cgroup, limit_file), 0)  # the gateway runs as the builder user

    result = farm.ssh("watcher", b1, "nixfarm metrics --json")

    assert result.returncode == 0
    mem = json.loads(result.stdout)["nix_daemon_memory"]
    assert mem["max_bytes"] is None
    assert limit_file in mem["error"] and "Permission denied" in mem["error"]
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("nixfarm: warning: nix-daemon memory:")


def test_prometheus_output_over_ssh_parses(farm: Farm) -> None:
    farm.add_client("watcher")
    b1 = farm.add_builder("b1", clients={"watcher": "metrics"}, memory_max=300 * MiB)

    result = farm.ssh("watcher", b1, "nixfarm metrics --prometheus")

    assert result.returncode == 0, result.stderr
    families = {f.name: f for f in text_string_to_metric_families(result.stdout)}
    assert families["nixfarm_daemon_memory_max_bytes"].samples[0].value == 300 * MiB
    assert families["nixfarm_store_size_bytes"].samples[0].value == 64 * MiB
    assert families["nixfarm_active_builds"].samples[0].value == 0
    assert all(name.startswith("nixfarm_") for name in families)
