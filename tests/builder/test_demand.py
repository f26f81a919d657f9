"""The clients' builds waiting for a machine: what a builder keeps of what its clients say."""

from __future__ import annotations

import grp
import json
import os
import time
from pathlib import Path

import pytest

from nixfarm.builder import demand


@pytest.mark.parametrize(
    ("line", "count"),
    [
        (b"demand 0", 0),
        (b"demand 12", 12),
        (b"  demand   7 ", 7),
        (b"demand 1000000", 1000000),
        (b"demand 1000001", None),  # more than any client has
        (b"demand 99999999", None),
        (b"demand -1", None),
        (b"demand 3.5", None),
        (b"demand", None),
        (b"demand 1 2", None),
        (b"DEMAND 1", None),
        (b"\xff\xfe", None),
    ],
)
def test_only_a_demand_line_with_a_sane_count_is_taken(line: bytes, count: int | None) -> None:
    assert demand.parse_line(line) == count


def test_every_stream_reads_the_fresh_counts_and_only_those(tmp_path: Path) -> None:
    os.mkdir(demand.demand_dir(str(tmp_path)))
    alice = demand.ClientDemand(str(tmp_path), "alice")
    bob = demand.ClientDemand(str(tmp_path), "bob")
    assert demand.read_demand(str(tmp_path)) == {}  # nobody has said anything yet
    alice.set(3)
    bob.set(0)
    assert demand.read_demand(str(tmp_path)) == {"alice": 3, "bob": 0}
    # A count nobody refreshed (its stream died without a word) is not believed.
    later = time.time() + demand.FRESH_FOR + 1
    assert demand.read_demand(str(tmp_path), now=later) == {}
    # Garbage in the directory is skipped, not fatal.
    (tmp_path / "demand" / "carol.json").write_text("{not json")
    (tmp_path / "demand" / "dave.json").write_text(json.dumps({"waiting": -4, "time": time.time()}))
    (tmp_path / "demand" / "erin.json").write_text(json.dumps({"waiting": True, "time": time.time()}))
    assert demand.read_demand(str(tmp_path)) == {"alice": 3, "bob": 0}
    alice.remove()
    assert demand.read_demand(str(tmp_path)) == {"bob": 0}


def test_without_the_agent_s_directory_there_is_no_demand(tmp_path: Path) -> None:
    assert demand.read_demand(str(tmp_path)) is None
    kept = demand.ClientDemand(str(tmp_path), "alice")
    kept.set(2)  # the stream goes on; it warns once
    assert "cannot keep the client's demand" in kept.problem
    os.mkdir(demand.demand_dir(str(tmp_path)))
    kept.refresh(force=True)  # the agent made the directory after all: retried
    assert kept.problem == "" and demand.read_demand(str(tmp_path)) == {"alice": 2}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown the directory (tests/run runs as root)")
def test_the_agent_makes_the_directory_for_its_control_group_only(tmp_path: Path) -> None:
    demand.prepare_dir(demand.demand_dir(str(tmp_path)), "")
    assert not os.path.exists(demand.demand_dir(str(tmp_path)))  # root only: no place for streams
    demand.prepare_dir(demand.demand_dir(str(tmp_path)), "nogroup")
    st = os.stat(demand.demand_dir(str(tmp_path)))
    assert (st.st_mode & 0o7777, st.st_uid) == (0o770, 0)
    assert st.st_gid == grp.getgrnam("nogroup").gr_gid
