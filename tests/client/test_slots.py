"""Holding back builder slots in Nix's own load accounting (nixfarm.client.slots)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Client, NixPair
from farm import Farm
from nixfarm.client import slots
from nixfarm.client.slots import SlotHolds, flocked_inodes, lock_prefixes, nix_base32

URI = "ssh-ng://nixfarm@10.201.7.2"


def client_holds(client: Client) -> SlotHolds:
    """Holds in the current-load of the store `client` builds from."""
    return SlotHolds(client.current_load)


def test_nix_base32_matches_nix() -> None:
    # `nix-hash --type sha256 --to-base32` of sha256("") (Nix's own test vector).
    assert nix_base32(hashlib.sha256(b"").digest()) == "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"


def test_lock_names_are_nix_and_lix_ones() -> None:
    cppnix, lix = lock_prefixes(URI)
    assert cppnix == "ssh-ng:__nixfarm@10.201.7.2"
    assert lix == cppnix + "-" + nix_base32(hashlib.sha256(URI.encode()).digest())[:16]
    long_uri = "ssh-ng://nixfarm@" + "b" * 80
    assert len(lock_prefixes(long_uri)[1]) == 48 + 1 + 16


def locked_elsewhere(path: Path) -> bool:
    """Would Nix find this slot busy? (another open file description tries flock)"""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _points_into(fd: str, directory: Path) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(f"{directory}/")
    except OSError:
        return False


def held_for_nix(directory: Path, name: str) -> bool:
    return (directory / name).exists() and locked_elsewhere(directory / name)


def busy(directory: Path, slots: int) -> list[int]:
    prefix = lock_prefixes(URI)[0]
    return [s for s in range(slots) if (directory / f"{prefix}-{s}").exists()
            and locked_elsewhere(directory / f"{prefix}-{s}")]  # fmt: skip


@pytest.fixture(params=["swap", "links"])
def switch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a slot's name is switched over: swapping it with a spare link (renameat2's
    RENAME_EXCHANGE), and, where a filesystem cannot swap names, links and a rename."""
    if request.param == "links":
        monkeypatch.setattr(slots, "_renameat2", None)
    return str(request.param)


def stashes(directory: Path) -> list[str]:
    """The names the dispatcher keeps files under: held slots' own files, and spare links."""
    return sorted(name for name in os.listdir(directory) if name.startswith(".nixfarm-own-"))


def spares(directory: Path) -> list[str]:
    """The stashes that are links to the held file, kept for the next take of their slot."""
    held = (directory / SlotHolds.HELD_NAME).stat().st_ino
    return [name for name in stashes(directory) if (directory / name).stat().st_ino == held]


def test_holds_the_highest_slots_and_lets_go_of_the_lowest(tmp_path: Path, switch: str) -> None:
    holds = SlotHolds(str(tmp_path))
    assert holds.hold(URI, 4, 3) == 3
    assert busy(tmp_path, 4) == [1, 2, 3]  # Nix takes the lowest free slot: 0 is left to it
    assert holds.hold(URI, 4, 1) == 1
    assert busy(tmp_path, 4) == [3]
    assert holds.hold(URI, 2, 2) == 2  # the capacity shrank: slot 3 is gone
    assert busy(tmp_path, 4) == [0, 1]
    holds.release_all()
    assert busy(tmp_path, 4) == []
    assert stashes(tmp_path) == []  # nothing of ours left behind


def test_a_slot_let_go_keeps_a_spare_link_and_is_taken_again_by_a_swap(tmp_path: Path) -> None:
    holds = SlotHolds(str(tmp_path), "nix")
    prefix = lock_prefixes(URI)[0]
    assert holds.hold(URI, 4, 3) == 3
    held = (tmp_path / SlotHolds.HELD_NAME).stat().st_ino
    assert holds.hold(URI, 4, 1) == 1  # slots 1 and 2 let go
    assert spares(tmp_path) == [f".nixfarm-own-{prefix}-1", f".nixfarm-own-{prefix}-2"]
    own = (tmp_path / f"{prefix}-1").stat().st_ino
    assert own != held and not locked_elsewhere(tmp_path / f"{prefix}-1")
    assert (tmp_path / f".nixfarm-own-{prefix}-1").stat().st_ino == held
    assert holds.hold(URI, 4, 3) == 3
    # Swapped: the name links to the held file, its own file waits under the spare's name.
    assert (tmp_path / f"{prefix}-1").stat().st_ino == held
    assert (tmp_path / f".nixfarm-own-{prefix}-1").stat().st_ino == own
    assert busy(tmp_path, 4) == [1, 2, 3]
    holds.release_all()
    assert busy(tmp_path, 4) == [] and stashes(tmp_path) == []


def test_spare_links_give_way_when_the_held_file_has_all_its_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file has at most so many links (65,000 on ext4): the held slots come first."""
    holds = SlotHolds(str(tmp_path), "nix")
    assert holds.hold(URI, 8, 6) == 6
    assert holds.hold(URI, 8, 2) == 2  # 4 spares
    held = tmp_path / SlotHolds.HELD_NAME
    limit = held.stat().st_nlink  # no link more from now on
    real_link = os.link

    def link(src: str, dst: str) -> None:
        if os.stat(src).st_ino == held.stat().st_ino and held.stat().st_nlink >= limit:
            raise OSError(errno.EMLINK, os.strerror(errno.EMLINK))
        real_link(src, dst)

    monkeypatch.setattr(slots.os, "link", link)
    other = "ssh-ng://nixfarm@10.201.7.3"
    assert holds.hold(other, 4, 1) == 1
    assert held_for_nix(tmp_path, f"{lock_prefixes(other)[0]}-3")
    assert spares(tmp_path) == []  # given way
    assert busy(tmp_path, 8) == [6, 7]  # the held ones stay held
    holds.release_all()


def test_thousands_of_slots_are_held_with_a_few_open_files(tmp_path: Path) -> None:
    """300 builders of 64 slots, each holding back 60 of its slots, in both namings: every
    one of the 36,000 names is locked for Nix, and the dispatcher has a handful of files open."""
    holds = SlotHolds(str(tmp_path))
    uris = [f"ssh-ng://nixfarm@10.202.{i // 250}.{i % 250}" for i in range(300)]
    for uri in uris:
        assert holds.hold(uri, 64, 60) == 60
    assert holds.hold(uris[0], 64, 64) == 64  # all of one builder: slot 0 has a file of its own
    # Our open files in that directory (other fds of this process come and go meanwhile): the
    # held file, two slot-0 files, and the 6 old files of the slots just switched over.
    opened = [fd for fd in os.listdir("/proc/self/fd") if _points_into(fd, tmp_path)]
    assert len(opened) == holds.open_files() == 9
    for p in lock_prefixes(uris[1]):
        assert [s for s in range(64) if held_for_nix(tmp_path, f"{p}-{s}")] == list(range(4, 64))
    assert holds.hold(uris[1], 64, 2) == 2
    prefix = lock_prefixes(uris[1])[0]
    assert [s for s in range(64) if held_for_nix(tmp_path, f"{prefix}-{s}")] == [62, 63]
    holds.release_all()
    assert not any(locked_elsewhere(tmp_path / name) for name in os.listdir(tmp_path))


def test_only_the_naming_of_the_client_s_nix_is_held_when_it_is_known(tmp_path: Path) -> None:
    cppnix, lix = lock_prefixes(URI)
    holds = SlotHolds(str(tmp_path), "nix")
    assert holds.hold(URI, 4, 2) == 2
    assert [s for s in range(4) if held_for_nix(tmp_path, f"{cppnix}-{s}")] == [2, 3]
    assert not any(name.startswith(lix) for name in os.listdir(tmp_path))
    holds.release_all()


def test_the_slots_of_a_dispatcher_that_died_are_free(tmp_path: Path, switch: str) -> None:
    """Its linked names outlive it, but name a file nobody locks; the next dispatcher
    links them to a file of its own."""
    code = (f"from nixfarm.client.slots import SlotHolds; import time; h = SlotHolds({str(tmp_path)!r}); "
            f"h.hold({URI!r}, 4, 3); print('held', flush=True); time.sleep(60)")  # fmt: skip
    dead = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert dead.stdout is not None and dead.stdout.readline() == "held\n"
    assert busy(tmp_path, 4) == [1, 2, 3]
    dead.kill()
    dead.wait()
    assert busy(tmp_path, 4) == []
    holds = SlotHolds(str(tmp_path))
    assert holds.hold(URI, 4, 2) == 2
    assert busy(tmp_path, 4) == [2, 3]
    holds.release_all()
    assert busy(tmp_path, 4) == []


def test_slots_nix_holds_are_skipped_not_waited_for(tmp_path: Path, switch: str) -> None:
    nix_fd = os.open(tmp_path / f"{lock_prefixes(URI)[0]}-3", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(nix_fd, fcntl.LOCK_EX)  # a running build's slot
    holds = SlotHolds(str(tmp_path))
    assert holds.hold(URI, 4, 4) == 3  # all but Nix's
    os.close(nix_fd)  # the build ends
    assert holds.hold(URI, 4, 4) == 4
    assert busy(tmp_path, 4) == [0, 1, 2, 3]


def test_the_locks_another_process_holds_are_read_from_proc_locks(tmp_path: Path) -> None:
    """What Nix's hooks hold (this client's builds in flight) is read without taking any lock."""
    prefix = lock_prefixes(URI)[0]
    holds = SlotHolds(str(tmp_path))
    assert holds.hold(URI, 4, 1) == 1  # ours: slot 3, never counted as Nix's
    assert holds.taken_by_nix(URI, 4, flocked_inodes()) == frozenset()
    # A hook's slot: flock holds it (--close: not its child), in a group of its own to end both.
    hook = subprocess.Popen(["flock", "--close", str(tmp_path / f"{prefix}-0"), "sleep", "30"],
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not holds.taken_by_nix(URI, 4, flocked_inodes()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert holds.taken_by_nix(URI, 4, flocked_inodes()) == {f"{prefix}-0"}
        # The same from the locks on this directory's filesystem only, as the dispatcher reads them.
        assert holds.device() is not None
        assert holds.taken_by_nix(URI, 4, flocked_inodes(device=holds.device())) == {f"{prefix}-0"}
        assert not (tmp_path / f"{prefix}-1").exists()  # reading opens (and locks) nothing
    finally:
        os.killpg(hook.pid, signal.SIGKILL)
        hook.wait()
    assert holds.taken_by_nix(URI, 4, flocked_inodes()) == frozenset()
    holds.release_all()


def test_nix_waits_while_every_slot_is_held_and_builds_when_one_is_let_go(farm: Farm, nix: NixPair) -> None:
    """Real Nix: a hook that started while the slots were held sees them let go (the lock
    files are named alike by Nix 2.8 and 2.26)."""
    key = farm.add_client("alice")
    b = farm.add_builder("b1", clients={"alice": "build"}, max_jobs=2, nix=nix.builder)
    client = Client(farm.root, poll_interval=1, nix=nix.client)
    holds = client_holds(client)
    uri = f"ssh-ng://nixfarm@{b.address}"
    assert holds.hold(uri, 2, 2) == 2
    try:
        proc = subprocess.Popen(client.build_argv(b.machines_line(key, max_jobs=2), count=1),
                                env=client.env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        time.sleep(4)
        assert proc.poll() is None, proc.communicate()
        assert holds.hold(uri, 2, 1) == 1  # slot 0 is free again
        out, err = proc.communicate(timeout=60)
    finally:
        holds.release_all()
    assert proc.returncode == 0, err[-3000:]
    assert client.read(out.strip()).split()[-1] == "b1"
    assert "waiting for a machine" in err  # Nix postponed it while every slot was held


def test_nix_sends_a_build_where_the_most_slots_are_free(farm: Farm, nix: NixPair) -> None:
    """Real Nix: with equal maxJobs and speedFactor on every line, the hook takes the builder
    whose line has the most slots it can lock (the dispatcher's way of steering it)."""
    key = farm.add_client("alice")
    b1, b2 = (
        farm.add_builder(n, clients={"alice": "build"}, max_jobs=3, nix=nix.builder) for n in ("b1", "b2")
    )
    client = Client(farm.root, poll_interval=1, nix=nix.client)
    machines = "\n".join(b.machines_line(key, max_jobs=3) for b in (b1, b2))
    holds = client_holds(client)
    placed = []
    try:
        for held in ((2, 1), (1, 2)):  # b1 has 1 free slot and b2 2, then the other way round
            for b, count in zip((b1, b2), held, strict=True):
                holds.hold(f"ssh-ng://nixfarm@{b.address}", 3, count)
            result = client.build(machines, count=1, seconds=0)
            assert result.returncode == 0, result.stderr[-3000:]
            placed.append(client.read(result.stdout.strip()).split()[-1])
    finally:
        holds.release_all()
    assert placed == ["b2", "b1"]
