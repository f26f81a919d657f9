"""The farm harness itself: real, isolated builders, and nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import farm as farm_mod
import nix_root
from conftest import Client


class Boom(Exception):
    pass


@pytest.mark.harness
def test_teardown_leaves_nothing_behind_even_when_the_test_fails() -> None:
    with pytest.raises(Boom), farm_mod.Farm() as f:
        f.add_client("alice")
        b1 = f.add_builder("b1", clients={"alice": "build"}, memory_max=256 << 20)
        f.add_builder("b2", clients={"alice": "metrics"})
        farm_id = f.id
        # Something to clean up in each builder: a long stream session.
        assert f.ssh("alice", b1, "nixfarm metrics").returncode == 0
        assert farm_mod.leftovers(farm_id) != []
        raise Boom
    assert farm_mod.leftovers(farm_id) == []


@pytest.mark.harness
def test_teardown_ends_the_shared_ssh_connections() -> None:
    """The demo and the benchmark share one connection per builder (shared_ssh_options);
    their masters must not outlive the farm."""
    with farm_mod.Farm() as f:
        f.add_client("alice")
        b1 = f.add_builder("b1", clients={"alice": "build"})
        farm_id = f.id
        sharing = f.shared_ssh_options("alice").split()
        assert f.ssh("alice", b1, "nixfarm stream --interval 1", *sharing).returncode == 0
        check = f.ssh("alice", b1, None, *sharing, "-O", "check")
        assert "Master running" in check.stderr, check.stderr
    assert farm_mod.leftovers(farm_id) == []


@pytest.mark.harness
def test_builders_are_isolated_hosts() -> None:
    with farm_mod.Farm() as f:
        f.add_client("alice")
        b1 = f.add_builder("b1", clients={"alice": "build"}, store_size="32m")
        b2 = f.add_builder("b2", clients={"alice": "build"}, store_size="48m")
        assert b1.address != b2.address
        # Each has its own store filesystem of its own size, its own PID 1, daemon and sshd.
        assert "32M" in b1.exec(["df", "-h", "/nix/store"]).stdout
        assert "48M" in b2.exec(["df", "-h", "/nix/store"]).stdout
        for b in (b1, b2):
            commands = [cmd for _, cmd in b.processes()]
            assert "farm_init.py" in dict(b.processes())[1]
            assert any(cmd.endswith("nix-daemon") for cmd in commands)
            assert any("sshd" in cmd and str(b.root) in cmd for cmd in commands)
        # A file in one builder's store is not in the other's, nor on the host.
        b1.exec(["touch", "/nix/store/only-in-b1"])
        assert b2.exec(["ls", "/nix/store/only-in-b1"], check=False).returncode != 0
        # Host keys differ and are pinned for clients.
        assert b1.host_key != b2.host_key
        assert f.known_hosts.read_text().count("ssh-ed25519") == 2


@pytest.mark.harness
def test_two_farms_side_by_side_get_their_own_addresses() -> None:
    with farm_mod.Farm() as f1, farm_mod.Farm() as f2:
        f1.add_client("alice")
        f2.add_client("alice")
        a = f1.add_builder("b1", clients={"alice": "metrics"})
        b = f2.add_builder("b1", clients={"alice": "metrics"})
        assert a.address != b.address
        assert f1.ssh("alice", a, "nixfarm metrics").returncode == 0
        assert f2.ssh("alice", b, "nixfarm metrics").returncode == 0


@pytest.mark.harness
def test_a_forked_copy_of_the_process_cannot_tear_the_farm_down() -> None:
    """pyroute2 forks helpers that run on in copies of our frames; one that unwinds
    through a `with Farm()` must leave the farm alone (it once deleted the demo's)."""
    with farm_mod.Farm() as f:
        f.add_client("alice")
        b = f.add_builder("b1", clients={"alice": "metrics"})
        pid = os.fork()
        if pid == 0:
            f.close()
            os._exit(0)
        os.waitpid(pid, 0)
        assert f.root.exists() and f.ssh("alice", b, "nixfarm metrics").returncode == 0


@pytest.mark.harness
def test_a_nix_2_26_builder_and_client_run_debian_13s_programs() -> None:
    """nix="2.26": the builder's daemon, sshd and gateway come from the Debian 13 root, the
    client's Nix and ssh too; the cached root is not written to; nothing is left behind."""
    root = nix_root.ensure_root()
    before = sorted(os.listdir(root / "etc"))
    with farm_mod.Farm() as f:
        f.add_client("alice")
        b = f.add_builder("b1", clients={"alice": "build"}, nix="2.26", store_size="32m")
        farm_id = f.id
        assert b.exec(["nix-daemon", "--version"]).stdout.strip() == "nix-daemon (Nix) 2.26.3"
        assert b.exec(["/usr/sbin/sshd", "-V"]).stderr.startswith("OpenSSH_10.0p2")
        assert "32M" in b.exec(["df", "-h", "/nix/store"]).stdout
        # The gateway (the working tree's, on the root's Python) answers over its sshd.
        metrics = f.ssh("alice", b, "nixfarm metrics --json")
        assert metrics.returncode == 0, metrics.stderr
        assert json.loads(metrics.stdout)["hostname"] == "b1"
        sshd_log = (b.root / "sshd.log").read_text()
        assert f"forced-command (key-option) '{nix_root.LAUNCHER} gateway" in sshd_log
        client = Client(f.root, nix="2.26")
        versions = subprocess.run(client.argv(["sh", "-c", "nix-build --version; ssh -V"]),
                                  capture_output=True, text=True, timeout=30)  # fmt: skip
        assert versions.stdout == "nix-build (Nix) 2.26.3\n", versions.stderr
        assert versions.stderr.startswith("OpenSSH_10.0p2")
        # Read-only: a stray write into the cache fails instead of changing it for every run.
        touch = b.exec(["touch", "/etc/nixfarm-stray"], check=False)
        assert touch.returncode != 0 and "Read-only file system" in touch.stderr
    assert sorted(os.listdir(root / "etc")) == before
    assert farm_mod.leftovers(farm_id) == []
