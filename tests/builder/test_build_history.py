"""The builds a builder runs and has finished, as snapshots report them (metrics.BuildHistory).

A fake /proc stands in for the process table here so that starts and ends
can be placed exactly; tests/test_metrics_remote.py checks the same against
real builds on the harness.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from nixfarm.builder.metrics import BUILDS_RECORD, BuildHistory, read_builds_record

BUILD_USER = 30001
TICK = os.sysconf("SC_CLK_TCK")


def started_ago(seconds: float) -> int:
    """A /proc start time (clock ticks since boot) `seconds` ago."""
    return int((time.clock_gettime(time.CLOCK_BOOTTIME) - seconds) * TICK)


def put_process(proc: Path, pid: int, uid: int, start: int) -> None:
    """A /proc/PID whose owner and stat field 22 (start time) are these."""
    d = proc / str(pid)
    d.mkdir()
    fields = ["S", *["0"] * 18, str(start), "0"]  # fields 3..23; field 22 is the start
    (d / "stat").write_text(f"{pid} (sh) S) {' '.join(fields)}\n")  # a ')' in the name too
    os.chown(d, uid, -1)


def remove_process(proc: Path, pid: int) -> None:
    (proc / str(pid) / "stat").unlink()
    (proc / str(pid)).rmdir()


def test_a_build_user_reused_by_the_next_build_counts_as_two_builds(tmp_path: Path) -> None:
    history = BuildHistory(frozenset({BUILD_USER}), proc=str(tmp_path))
    put_process(tmp_path, 100, BUILD_USER, started_ago(5.0))
    put_process(tmp_path, 101, BUILD_USER, started_ago(1.0))  # a child of the same build
    put_process(tmp_path, 102, 0, started_ago(9.0))  # not a build user's
    first = history.look()
    assert first["active"] == 1 and first["finished"] == []
    assert 4.5 <= first["ages_seconds"][0] <= 5.5  # the build's age is its oldest process's
    remove_process(tmp_path, 100)
    remove_process(tmp_path, 101)
    put_process(tmp_path, 103, BUILD_USER, started_ago(0.0))  # the next build, same user
    second = history.look()
    assert second["active"] == 1 and second["ages_seconds"][0] < 1.0
    ((ago, took),) = second["finished"]  # [seconds since it ended, seconds it ran]
    assert ago < 1.0 and 4.5 <= took <= 6.0
    assert history.unsaved


def test_the_record_the_agent_saves_is_what_a_later_stream_reads(tmp_path: Path) -> None:
    proc, state = tmp_path / "proc", tmp_path / "state"
    proc.mkdir()
    state.mkdir()
    assert read_builds_record(str(state)) is None  # no agent: the stream goes by its own
    history = BuildHistory(frozenset({BUILD_USER}), proc=str(proc))
    put_process(proc, 100, BUILD_USER, started_ago(3.0))
    history.look()
    remove_process(proc, 100)
    ((_, took),) = history.look()["finished"]
    history.save(str(state))
    assert not history.unsaved
    record = read_builds_record(str(state))
    assert record is not None and [t for _, t in record] == [took]
    assert abs(record[0][0] - time.time()) < 5  # when it ended, wall clock
    assert (state / BUILDS_RECORD).stat().st_mode & 0o777 == 0o644  # streams run as the builder user


def test_old_or_broken_records_are_no_record(tmp_path: Path) -> None:
    path = tmp_path / BUILDS_RECORD
    path.write_text(json.dumps({"finished": [[time.time() - 700, 2.0]]}))  # ended 11 minutes ago
    assert read_builds_record(str(tmp_path)) is None
    for broken in ("{trunc", "[]", '{"finished": [["x", 2.0]]}', '{"finished": [[1, 2, 3]]}'):
        path.write_text(broken)
        assert read_builds_record(str(tmp_path)) is None, broken
    path.write_text(json.dumps({"finished": [[time.time(), -1.0], [time.time(), 2.5]]}))
    record = read_builds_record(str(tmp_path))
    assert record is not None and [t for _, t in record] == [2.5]  # a negative duration is dropped


def test_a_process_is_looked_at_again_while_young_and_then_kept(tmp_path: Path) -> None:
    """The process table reads a process when it appears and while it may still setuid() or
    exec(); an old one is not read again (the look that made snapshots cost 100 ms with 3,000
    processes), until it exits."""
    from nixfarm.builder.processes import ProcessTable

    table = ProcessTable(frozenset({BUILD_USER}), proc=str(tmp_path))
    put_process(tmp_path, 200, 0, started_ago(1.0))  # Nix's build child, still root
    put_process(tmp_path, 201, 0, started_ago(60.0))  # an old root process
    table.look()
    assert table.builds() == {}
    os.chown(tmp_path / "200", BUILD_USER, -1)  # it setuid()s to its build user
    os.chown(tmp_path / "201", BUILD_USER, -1)  # (an old process cannot; were it to, unseen)
    table.look()
    assert set(table.builds()) == {BUILD_USER}
    assert len(table._kinds) == 2 and not table._young  # both settled now
    (tmp_path / "200" / "stat").unlink()
    (tmp_path / "200").rmdir()
    table.look()
    assert table.builds() == {} and list(table._kinds) == [201]


def test_sessions_are_the_gateway_s_nix_processes_and_never_a_build_user_s(tmp_path: Path) -> None:
    """A build session is nix-daemon or nix-store with NIXFARM_CLIENT in its environment (the
    gateway sets it). As root the agent reads everyone's, but a build could name any client."""
    from nixfarm.builder.processes import ProcessTable

    def session(pid: int, uid: int, comm: str, client: str) -> None:
        put_process(tmp_path, pid, uid, started_ago(30.0))
        (tmp_path / str(pid) / "stat").write_text(f"{pid} ({comm}) S {' '.join(['0'] * 17)} 100 0\n")
        (tmp_path / str(pid) / "environ").write_bytes(f"HOME=/\0NIXFARM_CLIENT={client}\0".encode())

    session(300, 1000, "nix-daemon", "alice")
    session(301, 1000, "nix-store", "alice")
    session(302, 1000, "nix-daemon", "bob")
    session(303, 1000, "python3", "carol")  # not a Nix session
    session(304, BUILD_USER, "nix-daemon", "mallory")  # a build pretending
    table = ProcessTable(frozenset({BUILD_USER}), proc=str(tmp_path))
    table.look()
    assert os.geteuid() == 0  # the harness runs as root, as the agent does
    assert table.sessions() == {"alice": 2, "bob": 1}


def test_a_build_s_cpu_time_is_read_from_its_own_processes_only(tmp_path: Path) -> None:
    """The accounts add up each build's CPU time (accounts.py) from the processes the table
    knows are its own, not from a walk of all of /proc at every sample."""
    from nixfarm.builder.attribution import build_processes
    from nixfarm.builder.processes import ProcessTable

    def put_cpu(pid: int, uid: int, start: int, ticks: tuple[int, int, int, int]) -> None:
        put_process(tmp_path, pid, uid, start)
        fields = ["S", *["0"] * 10, *map(str, ticks), "0", "0", "0", "0", str(start), "0"]
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (cc) {' '.join(fields)}\n")

    put_cpu(400, BUILD_USER, started_ago(9.0), (10, 5, 100, 0))  # the builder, and children it reaped
    put_cpu(401, BUILD_USER, started_ago(2.0), (3, 1, 0, 0))
    put_cpu(402, BUILD_USER + 1, started_ago(1.0), (7, 0, 0, 0))  # another build
    put_cpu(403, 0, started_ago(30.0), (999, 999, 0, 0))  # not a build's
    table = ProcessTable(frozenset({BUILD_USER, BUILD_USER + 1}), proc=str(tmp_path))
    table.look()
    pids = table.build_pids()
    assert {key: sorted(p) for key, p in pids.items()} == {BUILD_USER: [400, 401], BUILD_USER + 1: [402]}
    build = build_processes(pids[BUILD_USER], proc=str(tmp_path))
    assert build is not None and build.top == 400 and build.cpu_ticks == 10 + 5 + 100 + 3 + 1
    remove_process(tmp_path, 402)  # it ended since the table's look
    assert build_processes(pids[BUILD_USER + 1], proc=str(tmp_path)) is None
