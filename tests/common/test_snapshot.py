"""The snapshot's schema as a client checks it (common/snapshot.py): what a builder sends
comes from the network, so every field is checked and bounded before anything uses it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nixfarm.common.snapshot import BadSnapshot, _check_running, validate


def snap(capacity: int, active: int) -> dict[str, Any]:
    return {
        "schema": 1,
        "nix_config": {"max_jobs": capacity, "min_free_bytes": 0},
        "builds": {"active": active, "sessions_by_client": {}},
        "store": {"free_bytes": 10 << 30, "total_bytes": 20 << 30},
    }


def busy(capacity: int, active: int, ended_ago: list[Any]) -> dict[str, Any]:
    """A builder with `active` builds, where builds of 2 s ended that many seconds ago."""
    s = snap(capacity, active)
    s["builds"].update(ages_seconds=[1.0] * active, finished=[[ago, 2.0] for ago in ended_ago])
    return s


def with_demand(s: dict[str, Any], demand: Any) -> dict[str, Any]:
    s["builds"]["demand_by_client"] = demand
    return s


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"\xff\xfe", "not (UTF-8|JSON)"),
        (b"{trunc", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (json.dumps({**snap(1, 0), "schema": 2}).encode(), "schema version 2"),
        (json.dumps({"schema": 1}).encode(), "missing field"),
        (json.dumps({**snap(1, 0), "builds": {"active": -1}}).encode(), "non-negative"),
        (json.dumps({**snap(1, 0), "builds": {"active": True}}).encode(), "non-negative"),
        (json.dumps(busy(1, 1, [-1.0])).encode(), "pairs of numbers"),
        (json.dumps(busy(1, 1, [True])).encode(), "pairs of numbers"),
        # A NaN where min() and max() pass over it, and at the front; an infinity; too many seconds.
        (json.dumps(busy(1, 1, [1.0, float("nan"), 3.0])).encode(), "pairs of numbers"),
        (json.dumps(busy(1, 1, [float("nan"), 1.0])).encode(), "pairs of numbers"),
        (json.dumps(busy(1, 1, [float("inf")])).encode(), "pairs of numbers"),
        (json.dumps(busy(1, 1, [1e9])).encode(), "pairs of numbers"),
        (
            json.dumps({**snap(1, 0), "builds": {"active": 0, "sessions_by_client": {"a": True}}}).encode(),
            "sessions_by_client",
        ),
        (json.dumps({**snap(1, 0), "builds": {"active": 0, "finished": [[1.0]]}}).encode(), "pairs"),
        (json.dumps({**snap(1, 0), "builds": {"active": 0, "finished": [["1", 2]]}}).encode(), "pairs"),
        (json.dumps({**snap(1, 0), "builds": {"active": 0, "ages_seconds": {}}}).encode(), "lists"),
        (json.dumps(busy(1, 1, [1.0] * 5000)).encode(), "at most 4096"),
    ],
)
def test_bad_snapshots_say_what_is_wrong(line: bytes, reason: str) -> None:
    with pytest.raises(BadSnapshot, match=reason):
        validate(line)


def test_a_demand_that_is_not_a_count_is_a_bad_snapshot() -> None:
    too_many = {f"c{i}": 1 for i in range(5000)}
    for bad in (
        {"alice": -1},
        {"alice": True},
        {"alice": "3"},
        ["alice"],
        too_many,
        {"a": 1, "b": 10**6 + 1},
    ):
        with pytest.raises(BadSnapshot, match="demand_by_client"):
            validate(json.dumps(with_demand(snap(1, 0), bad)).encode())
    assert validate(json.dumps(with_demand(snap(1, 0), {"alice": 2})).encode())["builds"]["demand_by_client"]


@pytest.mark.parametrize(
    "running",
    [
        {},
        [1],
        [{"client": "a", "name": "n", "seconds": -1, "cpu_seconds": 0}],
        [{"client": "a" * 65, "name": "n", "seconds": 1, "cpu_seconds": 0}],
        [{"client": "a", "name": "n" * 201, "seconds": 1, "cpu_seconds": 0}],
        [{"client": 1, "name": "n", "seconds": 1, "cpu_seconds": 0}],
        [{"client": "a", "name": "n", "seconds": 1}],
        [{"client": "a", "name": "n", "seconds": 1, "cpu_seconds": 0}] * 4097,
    ],
)
def test_a_snapshot_s_bad_running_builds_are_refused(running: Any) -> None:
    with pytest.raises(BadSnapshot):
        _check_running(running)
