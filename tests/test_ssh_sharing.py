"""Connection sharing (the client module's `connectionSharing`) against Nix's readiness check.

Nix 2.16 and later (src/libstore/ssh.cc, SSHMaster::startCommand) start ssh
with `-oPermitLocalCommand=yes -oLocalCommand='echo started'` and then, unless
`ssh -O check` finds a master, wait for that line before they speak the
protocol: a session over a shared connection never prints it, a new connection
always does. Should the two disagree, the line lands in the protocol stream
("protocol mismatch, got 'started'", as NixOS/nix#14132 reports) or Nix waits
for a line that never comes. The Nix here (2.8) predates that check, so these
tests replay it step by step: a stand-in for the Nix that cannot run here, the
offload VM test runs the real one with the module. Everything else is real:
the module's own ssh_config block (modules/lib.nix, sshHostBlock), OpenSSH's
ssh, and a harness builder's sshd and gateway.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time

import pytest

from conftest import NIX_INSTANTIATE, nix_eval
from farm import Builder, Farm

pytestmark = [
    pytest.mark.skipif(NIX_INSTANTIATE is None, reason="needs nix-instantiate (tests/run installs nix-bin)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the block shares connections for root's ssh only"),
]

# What Nix adds to every ssh command line (ssh.cc, addCommonSSHOpts).
NIX_READINESS = ["-oPermitLocalCommand=yes", "-oLocalCommand=echo started"]


class Client:
    """One client machine's ssh as nix-daemon runs it: the module's block in ssh_config."""

    def __init__(self, farm: Farm, builder: Builder, persist: int = 60) -> None:
        self.sockets = farm.root / "nixfarm-ssh"
        self.sockets.mkdir(mode=0o700, exist_ok=True)
        arg = {
            "builder": {"hostName": "b1", "address": builder.address},
            "sshKey": str(farm.client_keys["alice"]),
            "controlDir": str(self.sockets),
            "controlPersist": persist,
        }
        block = nix_eval("lib.sshHostBlock arg", arg)
        self.config = farm.root / "ssh_config"
        self.config.write_text(block + "\n")
        # Nix writes the machine's host key to a file of its own, under the name it uses.
        self.known_hosts = farm.root / "nix_known_hosts"
        self.known_hosts.write_text(f"b1 {builder.host_key}\n{builder.address} {builder.host_key}\n")

    def options(self) -> list[str]:
        return ["-F", str(self.config), f"-oUserKnownHostsFile={self.known_hosts}", "-oBatchMode=yes"]

    def master_running(self) -> bool:
        """Nix's isMasterRunning(): `ssh -O check` with its usual options."""
        check = ["ssh", "-O", "check", "nixfarm@b1", *self.options(), *NIX_READINESS]
        return subprocess.run(check, capture_output=True, timeout=30).returncode == 0

    def stop_master(self) -> None:
        subprocess.run(["ssh", *self.options(), "-O", "exit", "nixfarm@b1"], capture_output=True, timeout=30)
        deadline = time.monotonic() + 10
        while self.master_running() and time.monotonic() < deadline:
            time.sleep(0.05)

    def connect_as_nix(self) -> str:
        """One connection the way Nix opens it; "ok" when the stream starts with the remote
        command's own output (a snapshot here, the daemon's magic for Nix)."""
        argv = ["ssh", "nixfarm@b1", "-x", *self.options(), *NIX_READINESS, "--"]
        proc = subprocess.Popen(
            [*argv, "nixfarm", "stream", "--interval", "1"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        outcome = "ok"
        if not self.master_running():
            line = proc.stdout.readline()
            if line != b"started\n":
                outcome = f"waited for 'started', got {line[:40]!r}"
        if outcome == "ok" and (first := proc.stdout.read(1)) != b"{":
            outcome = f"the stream began with {first + proc.stdout.read(16)!r}"
        try:
            proc.communicate(input=b"", timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            outcome += " (and ssh hung)"
        return outcome


@pytest.fixture
def builder(farm: Farm) -> Builder:
    farm.add_client("alice")
    return farm.add_builder("b1", clients={"alice": "build"})


def test_one_client_connecting_again_and_again(farm: Farm, builder: Builder) -> None:
    client = Client(farm, builder)
    # The first connection makes the master; the others share it.
    assert not client.master_running()
    outcomes = [client.connect_as_nix() for _ in range(10)]
    assert outcomes == ["ok"] * 10
    assert client.master_running()
    logins = builder.logins()
    assert logins == 1, f"{logins} logins for 10 connections: they were not shared"


def test_a_master_that_another_ssh_made(farm: Farm, builder: Builder) -> None:
    # NixOS/nix#14132's steps: a plain ssh leaves a master behind, then Nix connects.
    client = Client(farm, builder)
    plain = ["ssh", *client.options(), "nixfarm@b1", "nixfarm", "stream", "--interval", "1"]
    assert subprocess.run(plain, input=b"", capture_output=True, timeout=30).returncode == 0
    assert client.master_running()
    assert [client.connect_as_nix() for _ in range(5)] == ["ok"] * 5


def test_first_connections_at_once(farm: Farm, builder: Builder) -> None:
    # Several Nix processes on one client (CI jobs) reaching an idle builder together:
    # one ssh makes the master while the others are still connecting on their own.
    client = Client(farm, builder)
    outcomes: list[str] = []
    for _ in range(5):
        client.stop_master()
        outcomes += connect_at_once(client, 4)
    assert outcomes == ["ok"] * 20


def connect_at_once(client: Client, n: int) -> list[str]:
    """`n` connections started together, as `n` Nix processes would."""
    results = [""] * n

    def connect(i: int) -> None:
        results[i] = client.connect_as_nix()

    threads = [threading.Thread(target=connect, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_connections_as_the_shared_one_expires(farm: Farm, builder: Builder) -> None:
    # ControlPersist 1 s, connections about a second apart: some come as the master exits.
    client = Client(farm, builder, persist=1)
    outcomes = []
    for _ in range(10):
        outcomes.append(client.connect_as_nix())
        time.sleep(random.uniform(0.8, 1.3))
    assert outcomes == ["ok"] * 10
