"""`nixfarm builds` and `usage` on the client side: what builders answer is checked, then added up."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nixfarm.client.farmview import _bytes, _duration, check_report, running_rows, usage_rows


def report(**clients: dict[str, float]) -> dict[str, Any]:
    return {"builder": "b", "clients": clients}


def test_usage_adds_up_per_client_or_per_builder() -> None:
    reports = {
        "b1": report(alice={"builds_started": 2, "build_seconds": 10.0}, **{"": {"builds_started": 1}}),
        "b2": report(alice={"builds_started": 1, "build_seconds": 30.0}, bob={"builds_failed": 1}),
    }
    by_client = usage_rows(reports, "client")
    assert [r["client"] for r in by_client] == ["alice", "(local)", "bob"]  # the most build time first
    assert by_client[0]["builds_started"] == 3 and by_client[0]["build_seconds"] == 40.0
    by_builder = {r["builder"]: r["builds_started"] for r in usage_rows(reports, "builder")}
    assert by_builder == {"b1": 3, "b2": 1}


def test_running_builds_longest_first_with_the_local_client_named() -> None:
    snapshots = {
        "b1": {"builds": {"running": [{"client": "", "name": "x", "seconds": 3, "cpu_seconds": 1}]}},
        "b2": {"builds": {"running": [{"client": "alice", "name": "y", "seconds": 9, "cpu_seconds": 0}]}},
        "b3": {"builds": {}},
    }
    rows = running_rows(snapshots)
    assert [(r["builder"], r["client"], r["name"]) for r in rows] == [
        ("b2", "alice", "y"),
        ("b1", "(local)", "x"),
    ]


@pytest.mark.parametrize(
    "answer",
    [
        b"not json",
        b"[]",
        b'{"clients": []}',
        b'{"clients": {"alice": 3}}',
        b'{"clients": {"alice": {"builds_started": -1}}}',
        b'{"clients": {"alice": {"builds_started": true}}}',
        b'{"clients": {"alice": {"sent_bytes": "lots"}}}',
        json.dumps({"clients": {"x" * 65: {}}}).encode(),
        json.dumps({"clients": {f"c{i}": {} for i in range(5000)}}).encode(),
        b"\xff\xfe",
    ],
)
def test_a_builder_s_bad_accounts_are_refused(answer: bytes) -> None:
    with pytest.raises(ValueError):
        check_report(answer)


def test_durations_and_sizes_read_at_a_glance() -> None:
    assert [_duration(s) for s in (0.25, 42, 303, 11520, 180000)] == [
        "0.2s",
        "42s",
        "5m03s",
        "3h12m",
        "2d02h",
    ]
    assert [_bytes(n) for n in (512, 2048, 3 << 20, 5 << 40)] == ["512 B", "2.0 KiB", "3.0 MiB", "5.0 TiB"]
