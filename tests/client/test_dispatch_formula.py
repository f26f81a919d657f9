"""The dispatcher's pure parts: the allowance (claim), the lines and holds, snapshot checks, backoff."""

from __future__ import annotations

from pathlib import Path

import pytest

from nixfarm.client.dispatch import BuilderState, Dispatcher, Settings, claim, ending_soon
from nixfarm.client.inventory import Builder, Inventory
from nixfarm.client.slots import SlotHolds


def snap(capacity: int, active: int, sessions: dict[str, int] | None = None, psi: float = 0.0) -> dict:  # type: ignore[type-arg]
    return {
        "schema": 1,
        "nix_config": {"max_jobs": capacity, "min_free_bytes": 0},
        "builds": {"active": active, "sessions_by_client": sessions or {}},
        "store": {"free_bytes": 10 << 30, "total_bytes": 20 << 30},
        "psi": {"cpu_some_avg10": psi},
        "gc": {},
    }


def test_an_idle_builder_is_all_mine() -> None:
    assert claim(snap(4, 0), "alice") == 4


def test_free_slots_are_shared_among_the_clients_building_there() -> None:
    # bob builds 2 there; 2 slots left for alice and bob: alice may add 1.
    assert claim(snap(4, 2, {"bob": 2}), "alice") == 1
    # For bob, nobody else competes: its 2 and all 2 free.
    assert claim(snap(4, 2, {"bob": 2}), "bob") == 4


def test_one_free_slot_and_three_competitors_each_may_take_it() -> None:
    assert claim(snap(4, 3, {"bob": 2, "carol": 1}), "alice") == 1


def test_a_full_builder_gives_no_more_than_what_runs() -> None:
    assert claim(snap(4, 4, {"bob": 4}), "alice") == 0
    assert claim(snap(4, 4, {"alice": 3, "bob": 1}), "alice") == 3
    assert claim(snap(0, 0), "alice") == 0  # max-jobs 0: not a builder


def busy(capacity: int, active: int, ended_ago: list[float], sessions: dict[str, int]) -> dict:  # type: ignore[type-arg]
    """A builder with `active` builds, where builds of 2 s ended that many seconds ago."""
    s = snap(capacity, active, sessions)
    s["builds"].update(ages_seconds=[1.0] * active, finished=[[ago, 2.0] for ago in ended_ago])
    return s


def test_slots_about_to_free_are_as_many_as_freed_in_the_last_reaction() -> None:
    assert ending_soon(busy(4, 4, [0.3, 0.8, 1.2, 1.9, 2.5, 9.0], {}), within=2.0) == 4
    assert ending_soon(busy(4, 4, [0.3, 0.8, 1.2, 1.9, 2.5, 9.0], {}), within=1.0) == 2
    # A builder busy with long builds: its short ones ended long ago, nothing ends soon.
    assert ending_soon(busy(4, 4, [30.0, 30.1, 31.0], {}), within=2.0) == 0
    # No record at all: nothing expected (a new builder, an agent without history).
    assert ending_soon(busy(4, 4, [], {}), within=2.0) == 0
    # At most what runs there now (an idle builder frees nothing) and its capacity.
    assert ending_soon(busy(4, 1, [0.1, 0.2, 0.3], {}), within=2.0) == 1
    assert ending_soon(busy(2, 5, [0.1, 0.2, 0.3, 0.4], {}), within=2.0) == 2


def test_a_builder_turning_builds_over_takes_some_ahead() -> None:
    # Full with bob's builds, 3 of which ended within alice's reaction: she may send 1,
    # since bob competes for the 3 (3 // 2); without the look ahead she may send none.
    full = busy(4, 4, [0.5, 1.0, 1.5], {"bob": 4})
    assert claim(full, "alice", reaction=2.0) == 1
    assert claim(full, "alice", reaction=0.0) == 0
    # A builder busy with long builds takes nothing ahead: nothing parks behind them.
    long = busy(4, 4, [25.0, 26.0], {"bob": 4})
    assert claim(long, "alice", reaction=2.0) == 0
    # Builds waiting there count: with 4 freeing soon, 4 already waiting leave no room.
    queued = busy(4, 8, [0.2, 0.5, 1.0, 1.5], {"bob": 8})
    assert claim(queued, "alice", reaction=2.0) == 0


def inventory_of(*max_jobs: int, speed: tuple[int, ...] = ()) -> Inventory:
    """alice's inventory: builders b0, b1, ... with these static max_jobs (and speed factors)."""
    entries = [
        {"name": f"b{i}", "host_name": f"h{i}", "systems": ["x86_64-linux"], "host_key": "ssh-ed25519 AAAA",
         "max_jobs": jobs, "speed_factor": speed[i] if i < len(speed) else 1}
        for i, jobs in enumerate(max_jobs)
    ]  # fmt: skip
    return Inventory({"client": {"name": "alice", "key_file": "/k"}, "builders": entries}, "inventory")


def alice_with_one_builder(max_jobs: int = 2) -> Inventory:
    b = {"name": "b", "host_name": "h", "systems": ["x86_64-linux"], "host_key": "ssh-ed25519 AAAA"}
    data = {"client": {"name": "alice", "key_file": "/k"}, "builders": [{**b, "max_jobs": max_jobs}]}
    return Inventory(data, "inventory")


def dispatcher_in(tmp_path: Path, inventory: Inventory) -> Dispatcher:
    (tmp_path / "current-load").mkdir(exist_ok=True)
    holds = SlotHolds(str(tmp_path / "current-load"))
    return Dispatcher(inventory, str(tmp_path / "machines"), Settings(), str(tmp_path / "status.json"), holds)


def free_for_nix(d: Dispatcher, name: str) -> int:
    """How many slots of `name`'s line Nix's hook would find free now (it opens the files itself)."""
    nix = SlotHolds(d.holds.directory)
    try:
        return nix.hold(d.states[name].builder.store_uri, d.width(), d.width())
    finally:
        nix.release_all()


def lines_of(d: Dispatcher) -> list[list[str]]:
    return [
        line.split() for line in Path(d.machines_path).read_text().splitlines() if not line.startswith("#")
    ]


def test_every_line_has_the_same_width_and_the_allowance_is_what_nix_finds_free(tmp_path: Path) -> None:
    d = dispatcher_in(tmp_path, inventory_of(2, 1))
    d.states["b0"].healthy(snap(4, 3, {"bob": 3}), now=1.0, grace=3.0)  # alice may take 1 of 4
    d.changed(d.states["b0"])
    d.states["b1"].healthy(snap(1, 0), now=1.0, grace=3.0)  # idle, 1 slot: all alice's
    d.changed(d.states["b1"])
    d.publish()
    # The widest capacity, on every line, and one speedFactor: Nix's hook then prefers
    # the builder where the most of its slots are free, i.e. the biggest allowance.
    assert [(f[3], f[4]) for f in lines_of(d)] == [("4", "1"), ("4", "1")]
    assert (free_for_nix(d, "b0"), free_for_nix(d, "b1")) == (1, 1)
    d.states["b0"].healthy(snap(4, 4, {"bob": 4}), now=2.0, grace=3.0)
    d.changed(d.states["b0"])
    d.publish()
    assert free_for_nix(d, "b0") == 0
    d.holds.release_all()


def test_the_width_never_shrinks(tmp_path: Path) -> None:
    # A hook that read a wider file must still find everything beyond each allowance held.
    d = dispatcher_in(tmp_path, inventory_of(2, 2))
    d.states["b0"].healthy(snap(8, 0), now=1.0, grace=3.0)
    d.changed(d.states["b0"])
    d.states["b1"].healthy(snap(2, 0), now=1.0, grace=3.0)
    d.changed(d.states["b1"])
    d.publish()
    d.states["b0"].failed("down", "unreachable", Settings())
    d.changed(d.states["b0"])
    d.publish()
    assert [f[3] for f in lines_of(d)] == ["8"]  # b1 alone, still 8 wide
    assert free_for_nix(d, "b1") == 2 and free_for_nix(d, "b0") == 0
    d.holds.release_all()


def test_lines_go_faster_builders_first_then_bigger_ones(tmp_path: Path) -> None:
    # Ties in free slots go to the earlier line, so that order is the preference.
    d = dispatcher_in(tmp_path, inventory_of(1, 4, 2, 2, speed=(1, 1, 1, 3)))
    d.publish()
    for name in ("b0", "b1", "b2", "b3"):
        d.states[name].state, d.states[name].reason = "degraded", "bad metrics"
        d.changed(d.states[name])
    d.publish()
    hosts = [f[0].rsplit("@", 1)[-1] for f in lines_of(d)]
    assert hosts == ["h3", "h1", "h2", "h0"]
    d.holds.release_all()


def test_degraded_builders_offer_their_static_slots_and_left_out_ones_none() -> None:
    inventory = alice_with_one_builder(max_jobs=2)
    state = BuilderState(inventory.builders[0], reaction=2.0)
    state.healthy(snap(4, 0), now=1.0, grace=3.0)
    assert state.allowance("alice") == 4
    state.failed("degraded", "bad metrics", Settings())
    assert state.allowance("alice") == 2  # the inventory's max_jobs, as stock Nix
    state.failed("down", "unreachable", Settings())
    assert state.allowance("alice") == 0 and state.machines_line(inventory, 4) is None


def test_backoff_grows_3x_with_jitter_and_is_capped() -> None:
    s = Settings(backoff_base=60, backoff_factor=3, backoff_max=1800)
    for failures, expected in [(1, 60), (2, 180), (3, 540), (4, 1620), (5, 1800), (9, 1800)]:
        delay = s.backoff(failures)
        assert 0.8 * expected <= delay <= 1.2 * expected


def test_low_disk_leaves_only_after_the_grace_period() -> None:
    b = Builder(
        {"name": "b", "host_name": "h", "systems": ["x86_64-linux"], "host_key": "ssh-ed25519 AAAA"}, "b"
    )
    state = BuilderState(b, reaction=2.0)
    low = {
        **snap(2, 0),
        "store": {"free_bytes": 1 << 20, "total_bytes": 1 << 30},
        "gc": {"min_free_bytes": 16 << 20},
    }
    state.healthy(low, now=100.0, grace=3.0)
    assert state.state == "healthy" and state.reason.startswith("low disk")
    state.healthy(low, now=103.5, grace=3.0)
    assert state.state == "down" and state.reason.startswith("disk critical: 1 MiB free")
    state.healthy(snap(2, 0), now=104.0, grace=3.0)
    assert state.state == "healthy" and state.reason == ""


def test_status_rows_show_the_slots_held_back() -> None:
    from nixfarm.client.status import rows

    inventory = alice_with_one_builder()
    state = BuilderState(inventory.builders[0], reaction=2.0)
    state.healthy(snap(4, 3, {"bob": 3}), now=1.0, grace=3.0)
    (row,) = rows({"builders": [state.status(inventory, 4)]}, now=2.0)
    assert (row["jobs"], row["held back"], row["ahead"], row["state"]) == ("3/4", "3", "0", "healthy")
    assert row["mine"] == "-"  # the hooks' locks not read yet
    assert row["nix sees"].split()[3] == "4"
    # Two of bob's builds ended within alice's reaction: the builder takes 2 ahead.
    state.healthy(busy(4, 4, [0.5, 1.0], {"bob": 4}), now=1.5, grace=3.0)
    (row,) = rows({"builders": [state.status(inventory, 4)]}, now=2.0)
    assert (row["jobs"], row["held back"], row["ahead"]) == ("4/4", "3", "2")
    state.failed("down", "unreachable", Settings())
    (row,) = rows({"builders": [state.status(inventory, 4)]}, now=2.0)
    assert (row["held back"], row["nix sees"]) == ("4", "(left out)")  # all its slots
    state.saw_hooks(frozenset({"b-0"}))  # a build of alice's still on its way back from there
    (row,) = rows({"builders": [state.status(inventory, 4)]}, now=2.0)
    assert row["mine"] == "1"


def test_publishing_holds_the_slots_before_the_file_offers_them(tmp_path: Path) -> None:
    inventory = alice_with_one_builder(max_jobs=2)
    holds = SlotHolds(str(tmp_path / "current-load"))
    (tmp_path / "current-load").mkdir()
    machines = str(tmp_path / "machines")
    dispatcher = Dispatcher(inventory, machines, Settings(), str(tmp_path / "status.json"), holds)
    state = dispatcher.states["b"]
    state.healthy(snap(4, 3, {"bob": 3}), now=1.0, grace=3.0)
    dispatcher.changed(state)
    dispatcher.publish()
    assert Path(machines).read_text().splitlines()[1].split()[3] == "4"
    nix = SlotHolds(str(tmp_path / "current-load"))  # other open files, as Nix's hook has
    assert nix.hold(state.builder.store_uri, 4, 4) == 1  # only the 1 free slot is left to alice
    nix.release_all()
    state.failed("down", "unreachable", Settings())
    dispatcher.changed(state)
    dispatcher.publish()
    assert "ssh-ng://" not in Path(machines).read_text()
    assert nix.hold(state.builder.store_uri, 4, 4) == 0  # a hook that still lists it finds it full
    holds.release_all()


def test_a_current_load_that_cannot_be_written_is_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inventory = alice_with_one_builder()
    holds = SlotHolds(str(tmp_path / "missing"))  # gone: every hold fails
    dispatcher = Dispatcher(inventory, str(tmp_path / "machines"), Settings(), str(tmp_path / "s"), holds)
    dispatcher.states["b"].healthy(snap(1, 1, {"bob": 1}), now=1.0, grace=3.0)
    dispatcher.changed(dispatcher.states["b"])
    dispatcher.publish()
    dispatcher.publish()
    text = (tmp_path / "machines").read_text()
    assert text.count("ssh-ng://") == 1  # the file is still kept
    # Nothing is held, so the line offers the builder's capacity, not the width (2, static).
    assert text.splitlines()[1].split()[3] == "1"
    warnings = [r.getMessage() for r in caplog.records if "cannot hold slots of b" in r.getMessage()]
    assert len(warnings) == 1 and "missing" in warnings[0]
    # Once it can be written, the next publish holds the slots, with no new snapshot.
    (tmp_path / "missing").mkdir()
    dispatcher.publish()
    assert (tmp_path / "machines").read_text().splitlines()[1].split()[3] == "2"  # the width, held
    holds.release_all()


def test_a_budget_per_snapshot_what_ends_is_not_sent_again() -> None:
    inventory = alice_with_one_builder()
    state = BuilderState(inventory.builders[0], reaction=2.0)
    state.saw_hooks(frozenset())
    state.healthy(snap(4, 2, {"bob": 2}), now=1.0, grace=3.0)
    assert state.allowance("alice") == 1  # 2 free, alice and bob compete: 1 each
    assert state.saw_hooks(frozenset({"b-0"})) == (True, 1)  # her hook took a slot for it
    assert state.allowance("alice") == 1  # that one, and no more
    state.saw_hooks(frozenset())  # it ended before the next snapshot
    assert state.allowance("alice") == 0  # its slot is not hers to fill again
    state.healthy(snap(4, 2, {"bob": 2}), now=2.0, grace=3.0)
    assert state.allowance("alice") == 1  # the next snapshot shares what is free then


def test_builds_the_snapshot_does_not_show_yet_are_counted() -> None:
    inventory = alice_with_one_builder()
    state = BuilderState(inventory.builders[0], reaction=2.0)
    # Two of alice's hooks hold slots, the builder has seen one session of hers.
    state.saw_hooks(frozenset({"b-0", "b-1"}))
    state.healthy(snap(4, 2, {"alice": 1, "bob": 1}), now=1.0, grace=3.0)
    # 4 - 2 active - 1 unseen = 1 free, shared with bob: "1 if 0".
    assert state.allowance("alice") == 3
    state.healthy(snap(4, 3, {"alice": 2, "bob": 1}), now=2.0, grace=3.0)
    assert state.allowance("alice") == 3  # now seen: the same 1 free


def test_without_the_hooks_locks_the_snapshot_alone_decides() -> None:
    inventory = alice_with_one_builder()
    state = BuilderState(inventory.builders[0], reaction=2.0)
    state.healthy(snap(4, 2, {"alice": 1, "bob": 1}), now=1.0, grace=3.0)
    assert state.in_flight is None and state.allowance("alice") == claim(state.snapshot or {}, "alice") == 2
    state.saw_hooks(frozenset({"b-0"}))
    assert state.saw_hooks(None)[0]  # /proc/locks unreadable now: back to the snapshot's sessions
    assert state.in_flight is None and state.allowance("alice") == 2


def with_demand(s: dict, demand: dict[str, int]) -> dict:  # type: ignore[type-arg]
    s["builds"]["demand_by_client"] = demand
    return s


def test_clients_with_nothing_waiting_take_no_share() -> None:
    # alice runs 3 builds there but has nothing waiting: bob takes all 4 free slots.
    assert claim(with_demand(snap(7, 3, {"alice": 3}), {"alice": 0}), "bob") == 4
    # She still has builds waiting: they share, as without the dispatchers' word.
    assert claim(with_demand(snap(7, 3, {"alice": 3}), {"alice": 2}), "bob") == 2
    assert claim(snap(7, 3, {"alice": 3}), "bob") == 2
    # carol has no build there yet but waits for one: she competes too.
    assert claim(with_demand(snap(7, 3, {"alice": 3}), {"alice": 0, "carol": 1}), "bob") == 2
    # dave said nothing (an older dispatcher): his sessions count, as before.
    assert claim(with_demand(snap(7, 3, {"dave": 3}), {"alice": 0}), "bob") == 2


def test_a_client_stops_competing_only_once_nothing_has_waited_for_a_reaction() -> None:
    state = BuilderState(alice_with_one_builder().builders[0], reaction=2.0)
    state.saw_waiting(0, now=10.0)
    assert state.waiting == 0  # nothing has waited since it started: no demand
    state.saw_waiting(3, now=11.0)
    assert state.waiting == 3
    state.saw_waiting(0, now=12.0)  # its builds just took their slots; snapshots lag
    assert state.waiting == 3
    state.saw_waiting(0, now=13.1)
    assert state.waiting == 0


def test_the_watch_shows_the_builders_in_trouble_first_and_says_how_many_it_left_out() -> None:
    """`nixfarm status --watch` draws what fits the screen: the builders that are not healthy
    first, then a line counting the rest (rich draws a whole table before it crops it)."""
    from rich.console import Console

    from nixfarm.client.status import render

    builders = [{"name": f"b{i:03}", "state": "healthy", "line": f"line {i}"} for i in range(300)]
    builders[250]["state"], builders[251]["state"] = "down", "degraded"
    console = Console(width=200, record=True)
    console.print(render({"builders": builders, "client": "alice"}, 0.0, limit=10))
    text = console.export_text()
    assert "b250" in text and "b251" in text and "b009" not in text
    assert "290 more builders (298 healthy in all)" in text
