"""Per-client accounts: the ledger, what a metrics key may see, the gateway's session records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nixfarm.builder.accounts import COUNTERS, MAX_CLIENTS, Ledger, read_running, report
from nixfarm.builder.config import parse_duration
from nixfarm.builder.sessions import live_sessions, record_session, sessions_dir
from nixfarm.common.privacy import OTHERS, report_for, snapshot_for

HOUR = 3600.0
NOW = 1_800_000_000.0  # a whole hour


def test_ledger_keeps_totals_and_hourly_windows() -> None:
    ledger = Ledger()
    ledger.count("alice", NOW - 30 * HOUR, builds_started=1, cpu_seconds=2.5)
    ledger.count("alice", NOW - 0.5 * HOUR, builds_started=1, builds_finished=1)
    ledger.count("bob", NOW + 10, received_bytes=100, sent_bytes=7)
    assert ledger.window(None, NOW)["alice"]["builds_started"] == 2
    day = ledger.window(NOW - 24 * HOUR, NOW + 10)
    assert day["alice"]["builds_started"] == 1 and day["alice"]["cpu_seconds"] == 0
    assert day["bob"]["sent_bytes"] == 7
    # A window starts at the beginning of its first hour: 10 minutes back is this hour.
    assert set(ledger.window(NOW + 5, NOW + 10)) == {"bob"}
    assert set(ledger.window(NOW - HOUR + 600, NOW + 10)) == {"alice", "bob"}


def test_ledger_survives_its_record_and_forgets_old_hours() -> None:
    ledger = Ledger()
    ledger.count("alice", NOW - 40 * 24 * HOUR, builds_started=1)
    ledger.count("alice", NOW, build_seconds=12.5)
    ledger.forget_old(NOW)
    again = Ledger.from_json(ledger.to_json())
    assert again.totals == ledger.totals
    assert again.totals["alice"]["builds_started"] == 1  # all-time totals stay
    assert again.window(NOW - 60 * 24 * HOUR, NOW) == {
        "alice": {**dict.fromkeys(COUNTERS, 0), "build_seconds": 12.5}
    }


@pytest.mark.parametrize(
    "record",
    [
        b"[]",
        b'{"totals": {}}',
        b'{"totals": {"a": {"builds_started": -1}}, "hours": {}}',
        b'{"totals": {"a": {"builds_started": true}}, "hours": {}}',
        b'{"totals": {"a": []}, "hours": {}}',
        b'{"totals": {}, "hours": {"x": {}}}',
        b"not json",
    ],
)
def test_a_bad_record_is_refused(record: bytes) -> None:
    with pytest.raises(ValueError):
        Ledger.from_json(record)


def test_clients_beyond_the_limit_are_counted_together() -> None:
    ledger = Ledger()
    for i in range(MAX_CLIENTS + 5):
        ledger.count(f"c{i}", NOW, builds_started=1)
    assert len(ledger.totals) == MAX_CLIENTS + 1
    assert ledger.totals["(others)"]["builds_started"] == 5


def test_report_reads_the_agent_s_record(tmp_path: Path) -> None:
    assert report(str(tmp_path), None, NOW)["recorded"] is False
    ledger = Ledger()
    ledger.count("alice", NOW, builds_started=3)
    (tmp_path / "accounts.json").write_bytes(ledger.to_json())
    data = report(str(tmp_path), NOW - HOUR, NOW)
    assert data["recorded"] and data["clients"]["alice"]["builds_started"] == 3
    assert data["since"] == NOW - HOUR and data["until"] == NOW


def test_running_builds_record_must_be_fresh_and_is_bounded(tmp_path: Path) -> None:
    assert read_running(str(tmp_path)) is None
    now = time.time()
    builds = [{"client": "alice", "name": "x" * 500, "started": now - 12, "cpu_seconds": 1.5}] * 300
    (tmp_path / "running.json").write_text(json.dumps({"time": now, "running": builds}))
    running = read_running(str(tmp_path))
    assert running is not None and len(running) == 256
    assert running[0]["client"] == "alice" and len(running[0]["name"]) == 200
    assert 11 < running[0]["seconds"] < 20 and running[0]["cpu_seconds"] == 1.5
    (tmp_path / "running.json").write_text(json.dumps({"time": now - 3600, "running": builds}))
    assert read_running(str(tmp_path)) is None  # the agent stopped looking: not believed


def test_a_metrics_key_sees_only_its_own_name() -> None:
    snapshot = {
        "load": {"avg1": 1.0},
        "builds": {
            "active": 3,
            "sessions_by_client": {"alice": 2, "bob": 1, "watcher": 1},
            "demand_by_client": {"alice": 4, "bob": 0},
            "running": [{"client": "alice", "name": "hello"}, {"client": "watcher", "name": "w"}],
        },
    }
    seen = snapshot_for(snapshot, "watcher")
    assert seen["builds"]["sessions_by_client"] == {OTHERS: 3, "watcher": 1}
    assert seen["builds"]["demand_by_client"] == {OTHERS: 4}
    assert [b["client"] for b in seen["builds"]["running"]] == [OTHERS, "watcher"]
    assert seen["load"] == snapshot["load"] and seen["builds"]["active"] == 3
    assert "alice" in json.dumps(snapshot) and "alice" not in json.dumps(seen)  # the original is untouched
    accounts = {"clients": {"alice": {"builds_started": 2}, "bob": {"builds_started": 1}}, "until": NOW}
    assert report_for(accounts, "watcher")["clients"] == {OTHERS: {"builds_started": 3}}


def test_sessions_are_recorded_and_forgotten_when_they_end(tmp_path: Path) -> None:
    os.mkdir(sessions_dir(str(tmp_path)))
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from nixfarm.builder.sessions import record_session; "
         "record_session(sys.argv[1], 'alice'); print('ok', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline() == "ok\n"
        record_session(str(tmp_path), "bob")  # this process
        assert live_sessions(str(tmp_path)) == {child.pid: "alice", os.getpid(): "bob"}
    finally:
        child.kill()
        child.wait()
    # A reused PID (another start time), a file being written, and junk.
    Path(sessions_dir(str(tmp_path)), str(os.getpid())).write_text("bob 1\n")
    Path(sessions_dir(str(tmp_path)), "1").write_text("")
    Path(sessions_dir(str(tmp_path)), "notapid").write_text("x")
    assert live_sessions(str(tmp_path)) == {}
    assert sorted(os.listdir(sessions_dir(str(tmp_path)))) == ["1", "notapid"]  # young and empty; not ours


def test_without_the_agent_s_directory_the_gateway_records_nothing(tmp_path: Path) -> None:
    record_session(str(tmp_path), "alice")  # no error: accounts are best effort
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("2w", 1209600)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "0", "-1h", "1.5h", "1y", "99999999999d", "1 h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)
