"""The Prometheus rendering of a real snapshot, checked with prometheus_client's own parser."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

import nixfarm
from conftest import REPO
from nixfarm.builder.config import AgentConfig
from nixfarm.builder.metrics import Collector
from nixfarm.builder.prometheus import render

# Families whose value is a number of bytes (the parser's names; gauges keep theirs).
BYTE_GAUGES = {
    "nixfarm_memory_total_bytes",
    "nixfarm_memory_available_bytes",
    "nixfarm_store_free_bytes",
    "nixfarm_store_size_bytes",
    "nixfarm_daemon_memory_current_bytes",
    "nixfarm_daemon_memory_max_bytes",
    "nixfarm_min_free_bytes",
    "nixfarm_max_free_bytes",
    "nixfarm_gc_last_freed_bytes",
}
KNOWN_DAEMON_MEMORY = {
    "source": "cgroup2",
    "cgroup": "/system.slice/nix-daemon.service",
    "current_bytes": 123_456_789,
    "max_bytes": None,
    "oom_kills": 2,
    "error": None,
}
KNOWN_NETWORK = {
    "rx_bytes_total": 1_000_000,
    "tx_bytes_total": 2_000_000,
    "rx_bytes_per_second": 10.5,
    "tx_bytes_per_second": None,
}


def snapshot_of(directory: Path) -> dict[str, Any]:
    """A real snapshot of this machine, with store, state and nix.conf in `directory`."""
    collector = Collector(
        AgentConfig(store_dir=str(directory), state_dir=str(directory), nix_conf_dir=str(directory))
    )
    try:
        return collector.snapshot()
    finally:
        collector.close()


@pytest.fixture
def snapshot(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A snapshot of this machine, with a known nix.conf and GC state file."""
    (tmp_path / "nix.conf").write_text("max-jobs = 3\ncores = 2\nmin-free = 1G\n")
    (tmp_path / "gc-state.json").write_text(
        json.dumps(
            {
                "running": False,
                "last_run": 1700000000.25,
                "bytes_freed": 5 << 20,
                "duration_seconds": 1.5,
            }
        )
    )
    snap = snapshot_of(tmp_path)
    # Whether this machine runs a nix-daemon, or lets us read netlink, is not up to the test.
    snap["nix_daemon_memory"] = dict(KNOWN_DAEMON_MEMORY)
    snap["network"] = dict(KNOWN_NETWORK)
    yield snap


def families(text: str) -> dict[str, Metric]:
    parsed = list(text_string_to_metric_families(text))
    by_name = {f.name: f for f in parsed}
    assert len(by_name) == len(parsed), "a metric family appears twice"
    return by_name


def value(fams: dict[str, Metric], name: str) -> float:
    (sample,) = fams[name].samples
    return float(sample.value)


def test_render_parses_and_ends_with_newline(snapshot: dict[str, Any]) -> None:
    text = render(snapshot)
    assert text.endswith("\n")
    assert not text.endswith("\n\n")
    assert len(families(text)) >= 25


def test_every_name_has_the_nixfarm_prefix(snapshot: dict[str, Any]) -> None:
    for family in families(render(snapshot)).values():
        assert family.name.startswith("nixfarm_")
        assert family.documentation, f"{family.name} has no HELP"
        for sample in family.samples:
            assert sample.name.startswith("nixfarm_")


def test_counters_end_in_total(snapshot: dict[str, Any]) -> None:
    counters = [f for f in families(render(snapshot)).values() if f.type == "counter"]
    names = {s.name for f in counters for s in f.samples}
    assert names == {
        "nixfarm_daemon_oom_kills_total",
        "nixfarm_network_receive_bytes_total",
        "nixfarm_network_transmit_bytes_total",
    }


def test_type_lines_name_the_sample(snapshot: dict[str, Any]) -> None:
    """Text format 0.0.4: a counter's TYPE line carries the `_total` name its sample has."""
    text = render(snapshot)
    assert "# TYPE nixfarm_network_receive_bytes_total counter\n" in text
    assert "\nnixfarm_network_receive_bytes_total 1000000\n" in text


def test_byte_gauges_end_in_bytes(snapshot: dict[str, Any]) -> None:
    fams = families(render(snapshot))
    assert set(fams) >= BYTE_GAUGES
    for name in BYTE_GAUGES:
        assert fams[name].type == "gauge"
        assert name.endswith("_bytes")
    for family in fams.values():
        if family.type == "gauge" and "bytes" in family.name:
            assert family.name in BYTE_GAUGES


def test_seconds_gauges_end_in_seconds(snapshot: dict[str, Any]) -> None:
    fams = families(render(snapshot))
    assert value(fams, "nixfarm_snapshot_timestamp_seconds") == snapshot["timestamp"]
    assert value(fams, "nixfarm_gc_last_run_timestamp_seconds") == 1700000000.25
    assert value(fams, "nixfarm_gc_last_duration_seconds") == 1.5


def test_values_round_trip(snapshot: dict[str, Any]) -> None:
    fams = families(render(snapshot))
    store = snapshot["store"]
    assert value(fams, "nixfarm_store_free_bytes") == store["free_bytes"]
    assert value(fams, "nixfarm_store_size_bytes") == store["total_bytes"]
    assert value(fams, "nixfarm_store_free_inodes") == store["free_inodes"]
    assert value(fams, "nixfarm_store_inodes") == store["total_inodes"]
    assert store["total_bytes"] > 0
    assert value(fams, "nixfarm_cpus") == len(os.sched_getaffinity(0))
    assert value(fams, "nixfarm_max_jobs") == 3
    assert value(fams, "nixfarm_cores") == 2
    assert value(fams, "nixfarm_min_free_bytes") == 1 << 30
    assert value(fams, "nixfarm_memory_total_bytes") == snapshot["memory"]["total_bytes"]
    assert value(fams, "nixfarm_memory_available_bytes") == snapshot["memory"]["available_bytes"]
    assert value(fams, "nixfarm_load1") == snapshot["load"]["avg1"]
    assert value(fams, "nixfarm_load15") == snapshot["load"]["avg15"]
    assert value(fams, "nixfarm_active_builds") == snapshot["builds"]["active"]
    assert value(fams, "nixfarm_daemon_memory_current_bytes") == 123_456_789
    assert value(fams, "nixfarm_daemon_oom_kills") == 2
    assert value(fams, "nixfarm_network_receive_bytes") == 1_000_000
    assert value(fams, "nixfarm_network_transmit_bytes") == 2_000_000
    assert value(fams, "nixfarm_gc_running") == 0
    assert value(fams, "nixfarm_gc_last_freed_bytes") == 5 << 20


def test_info_metrics_carry_labels(snapshot: dict[str, Any]) -> None:
    fams = families(render(snapshot))
    (agent,) = fams["nixfarm_agent_info"].samples
    assert agent.labels == {
        "hostname": socket.gethostname(),
        "version": nixfarm.version(),
        "schema": "1",
    }
    assert agent.value == 1
    systems = fams["nixfarm_system_info"].samples
    assert [s.labels["system"] for s in systems] == snapshot["systems"]
    features = fams["nixfarm_feature_info"].samples
    assert [s.labels["feature"] for s in features] == snapshot["features"]
    assert {s.value for s in systems + features} == {1}


def test_pressure_is_a_ratio_per_resource_and_kind(snapshot: dict[str, Any]) -> None:
    snapshot["psi"] = {"cpu_some_avg10": 12.5, "memory_full_avg10": 0.0, "io_some_avg10": 100.0}
    samples = families(render(snapshot))["nixfarm_pressure_avg10_ratio"].samples
    got = {(s.labels["resource"], s.labels["kind"]): s.value for s in samples}
    assert got == {("cpu", "some"): 0.125, ("memory", "full"): 0.0, ("io", "some"): 1.0}


def test_unlimited_is_plus_inf(snapshot: dict[str, Any]) -> None:
    assert snapshot["nix_config"]["max_free_bytes"] is None
    text = render(snapshot)
    assert "\nnixfarm_max_free_bytes +Inf\n" in text
    assert "\nnixfarm_daemon_memory_max_bytes +Inf\n" in text
    fams = families(text)
    assert value(fams, "nixfarm_max_free_bytes") == math.inf
    assert value(fams, "nixfarm_daemon_memory_max_bytes") == math.inf


def test_limits_are_rendered_as_numbers(snapshot: dict[str, Any]) -> None:
    snapshot["nix_config"]["max_free_bytes"] = 10 << 30
    snapshot["nix_daemon_memory"]["max_bytes"] = 4 << 30
    fams = families(render(snapshot))
    assert value(fams, "nixfarm_max_free_bytes") == 10 << 30
    assert value(fams, "nixfarm_daemon_memory_max_bytes") == 4 << 30


def test_unknown_values_are_left_out(snapshot: dict[str, Any]) -> None:
    snapshot["nix_daemon_memory"] = {
        "source": None,
        "cgroup": None,
        "current_bytes": None,
        "max_bytes": None,
        "oom_kills": None,
        "error": "no nix-daemon process found",
    }
    snapshot["gc"] = {
        "running": False,
        "last_run": None,
        "bytes_freed": None,
        "duration_seconds": None,
        "error": None,
    }
    fams = families(render(snapshot))
    for name in (
        "nixfarm_daemon_memory_current_bytes",
        "nixfarm_daemon_memory_max_bytes",
        "nixfarm_daemon_oom_kills",
        "nixfarm_gc_last_run_timestamp_seconds",
        "nixfarm_gc_last_freed_bytes",
        "nixfarm_gc_last_duration_seconds",
    ):
        assert name not in fams
    assert value(fams, "nixfarm_gc_running") == 0


def test_gc_running_is_one(snapshot: dict[str, Any]) -> None:
    snapshot["gc"]["running"] = True
    assert value(families(render(snapshot)), "nixfarm_gc_running") == 1


def test_label_values_are_escaped(snapshot: dict[str, Any]) -> None:
    hostname = 'evil"host\\name\nnixfarm_cpus 999'
    snapshot["hostname"] = hostname
    snapshot["features"] = ['big"parallel', "back\\slash"]
    text = render(snapshot)
    assert 'hostname="evil\\"host\\\\name\\nnixfarm_cpus 999"' in text
    fams = families(text)
    (agent,) = fams["nixfarm_agent_info"].samples
    assert agent.labels["hostname"] == hostname
    features = [s.labels["feature"] for s in fams["nixfarm_feature_info"].samples]
    assert features == ['big"parallel', "back\\slash"]
    # The newline in the label did not start a sample of its own.
    assert value(fams, "nixfarm_cpus") == snapshot["cpus"]


def test_without_psi_and_network(snapshot: dict[str, Any]) -> None:
    snapshot["psi"] = None
    snapshot["network"] = None
    fams = families(render(snapshot))
    assert "nixfarm_pressure_avg10_ratio" not in fams
    assert "nixfarm_network_receive_bytes" not in fams
    assert "nixfarm_network_transmit_bytes" not in fams
    assert value(fams, "nixfarm_cpus") == snapshot["cpus"]
    assert value(fams, "nixfarm_store_free_bytes") == snapshot["store"]["free_bytes"]


def test_real_snapshot_sections_have_the_expected_shape(tmp_path: Path) -> None:
    """The unmodified snapshot of this machine renders too (whatever its daemon and network)."""
    snap = snapshot_of(tmp_path)
    fams = families(render(snap))
    assert value(fams, "nixfarm_max_jobs") == 1
    assert value(fams, "nixfarm_max_free_bytes") == math.inf
    assert value(fams, "nixfarm_store_free_bytes") == snap["store"]["free_bytes"]


ACCOUNTS = {
    "alice": {"builds_started": 3, "builds_finished": 2, "builds_failed": 1, "build_seconds": 12.5,
              "cpu_seconds": 30.25, "received_bytes": 1000, "sent_bytes": 5000},
    "": {"builds_started": 1, "builds_finished": 1, "builds_failed": 0, "build_seconds": 1.0,
         "cpu_seconds": 0.5, "received_bytes": 0, "sent_bytes": 0},
}  # fmt: skip
PROMTOOL = "/var/cache/nixfarm-test/promtool/usr/bin/promtool"  # tests/run unpacks it


def with_running_builds(snapshot: dict[str, Any]) -> dict[str, Any]:
    running = [{"client": "alice", "name": "a", "seconds": 3.0, "cpu_seconds": 1.0}] * 2
    return {**snapshot, "builds": {**snapshot["builds"], "running": running}}


def test_per_client_counters_carry_the_client_label(snapshot: dict[str, Any]) -> None:
    fams = families(render(with_running_builds(snapshot), ACCOUNTS))
    started = {s.labels["client"]: s.value for s in fams["nixfarm_client_builds_started"].samples}
    assert started == {"alice": 3, "(local)": 1}  # the builder's own builds
    assert fams["nixfarm_client_builds_started"].type == "counter"
    cpu = {s.labels["client"]: s.value for s in fams["nixfarm_client_cpu_seconds"].samples}
    assert cpu["alice"] == 30.25
    (running,) = fams["nixfarm_client_running_builds"].samples
    assert (running.labels, running.value) == ({"client": "alice"}, 2)


def test_promtool_accepts_the_exposition(snapshot: dict[str, Any]) -> None:
    for text in (render(snapshot), render(with_running_builds(snapshot), ACCOUNTS)):
        check = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0, check.stdout + check.stderr


def test_the_grafana_dashboard_asks_only_for_metrics_the_agent_exports(snapshot: dict[str, Any]) -> None:
    dashboard = json.loads((REPO / "examples" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    wanted = {name for e in exprs for name in re.findall(r"\bnixfarm_[a-z0-9_]+", e)}
    exported = set(
        re.findall(r"^# TYPE (\S+)", render(with_running_builds(snapshot), ACCOUNTS), re.MULTILINE)
    )
    assert len(wanted) >= 10
    assert wanted <= exported, wanted - exported
