"""Connection sharing (the client module's `connectionSharing`) against Nix's readiness check.

Nix 2.16 and later (src/libstore/ssh.cc, SSHMaster::startCommand) start ssh
with `-oPermitLocalCommand=yes -oLocalCommand='echo started'` and then, unless
`ssh -O check` finds a master, wait for that line before they speak the
protocol: a session over a shared connection never prints it, a new connection
always does. Should the two disagree, the line lands in the protocol stream
("protocol mismatch, got 'started'", as NixOS/nix#14132 reports) or Nix waits
for a line that never comes.

The real check: Nix 2.26 with OpenSSH 10 (tests/nix_root.py) builds through
the module's own ssh_config block (modules/lib.nix, sshHostBlock) and known
hosts on a harness builder: builds one after another over one connection, after
a master that another ssh made (#14132's steps), and as the shared connection
expires. Not here: first connections at once. With real Nix 2.26 they are not
clean: bursts of 4 builds at once on an idle builder, 30 bursts (ControlPersist
1 s, so each burst finds no master), lost 8 of 120 builds: 5 failed with
"protocol mismatch, got 'started'" and 3 hung in Nix's wait for the line (no
timeout). Two ssh processes that both find no master both try to become it;
the loser goes on alone ("ControlSocket ... already exists, disabling
multiplexing"), prints the line, and Nix, whose `ssh -O check` now finds the
winner, does not read it. docs/client.md ("Connection sharing") says so.

The replay: the same check done step by step with the machine's OpenSSH 9.2
(Debian 12's; a Nix from the installer on Debian 12 uses it): what it adds is
that ssh. Its replay of first connections at once passed where real Nix fails,
so it is gone.
"""

from __future__ import annotations

import os
import random
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import NIX_INSTANTIATE, nix_eval
from conftest import Client as NixBuilds
from farm import Builder, Farm, current_system

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


def test_connections_as_the_shared_one_expires(farm: Farm, builder: Builder) -> None:
    # ControlPersist 1 s, connections about a second apart: some come as the master exits.
    client = Client(farm, builder, persist=1)
    outcomes = []
    for _ in range(10):
        outcomes.append(client.connect_as_nix())
        time.sleep(random.uniform(0.8, 1.3))
    assert outcomes == ["ok"] * 10


# -- the real thing: Nix 2.26's own readiness check, OpenSSH 10 ---------------------------


class NixClient:
    """A client machine with Nix 2.26 (tests/nix_root.py) and the module's ssh configuration:
    its block, and the builder's host key under every name it may be known by, as
    programs.ssh.knownHosts writes them to /etc/ssh/ssh_known_hosts."""

    def __init__(self, farm: Farm, builder: Builder, persist: int = 60) -> None:
        self.builder = builder
        self.nix = NixBuilds(farm.root, poll_interval=1, nix="2.26")
        self.sockets = farm.root / "nixfarm-ssh"
        self.sockets.mkdir(mode=0o700, exist_ok=True)
        entry = {"hostName": "b1", "address": builder.address}
        arg = {"builder": entry, "sshKey": str(farm.client_keys["alice"]),
               "controlDir": str(self.sockets), "controlPersist": persist}  # fmt: skip
        known_hosts = farm.root / "ssh_known_hosts"
        names = nix_eval("lib.knownHostNames arg", entry)
        known_hosts.write_text("".join(f"{name} {builder.host_key}\n" for name in names))
        self.config = farm.root / "ssh_config"
        block = nix_eval("lib.sshHostBlock arg", arg)
        self.config.write_text(f"GlobalKnownHostsFile {known_hosts}\n{block}")
        self.key = farm.client_keys["alice"]

    def build(self, protocol: str, seconds: int = 0) -> str:
        """One nix-build on the builder by the name the block matches; "ok" or what failed."""
        line = f"{protocol}://nixfarm@b1 {current_system()} {self.key} 4 1 - - {self.builder.host_key_b64}"
        # The block stands in for /etc/ssh/ssh_config, which the root (read-only) cannot have.
        env = {**self.nix.env(), "NIX_SSHOPTS": f"-F {self.config}"}
        r = subprocess.run(self.nix.build_argv(line, seconds=seconds), env=env, text=True,
                           capture_output=True, timeout=120)  # fmt: skip
        if r.returncode != 0:
            return r.stderr.strip()[-800:]
        return "ok" if self.nix.read(r.stdout.strip()) == "built on b1\n" else f"built elsewhere: {r.stdout}"

    def master_running(self) -> bool:
        check = ["ssh", "-F", str(self.config), "-O", "check", "b1"]
        return subprocess.run(self.nix.argv(check), capture_output=True, timeout=30).returncode == 0


@pytest.fixture
def builder_226(farm: Farm) -> Builder:
    farm.add_client("alice")
    return farm.add_builder("b1", clients={"alice": "build"}, nix="2.26")


@pytest.mark.parametrize("protocol", ["ssh-ng", "ssh"])
def test_real_nix_builds_again_and_again_over_one_connection(
    farm: Farm, builder_226: Builder, protocol: str
) -> None:
    client = NixClient(farm, builder_226)
    # OpenSSH 10 keeps its own QoS marks with the block (an `IPQoS throughput` turned them off).
    resolved = subprocess.run(client.nix.argv(["ssh", "-G", "-F", str(client.config), "b1"]),
                              capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    assert "\nipqos ef cs1\n" in resolved
    assert [client.build(protocol) for _ in range(4)] == ["ok"] * 4
    assert client.master_running()
    assert builder_226.logins() == 1, "the builds did not share one connection"


def test_real_nix_after_a_master_another_ssh_made(farm: Farm, builder_226: Builder) -> None:
    # NixOS/nix#14132's steps with the Nix that has the check: a plain ssh leaves a master behind.
    client = NixClient(farm, builder_226)
    plain = ["ssh", "-F", str(client.config), "b1", "nixfarm", "metrics"]
    assert subprocess.run(client.nix.argv(plain), capture_output=True, timeout=30).returncode == 0
    assert client.master_running()
    assert [client.build("ssh-ng") for _ in range(2)] == ["ok"] * 2
    assert builder_226.logins() == 1


def test_real_nix_builds_as_the_shared_connection_expires(farm: Farm, builder_226: Builder) -> None:
    # ControlPersist 1 s, builds about a second apart: some start as the master exits.
    client = NixClient(farm, builder_226, persist=1)
    outcomes = []
    for _ in range(6):
        outcomes.append(client.build("ssh-ng"))
        time.sleep(random.uniform(0.8, 1.3))
    assert outcomes == ["ok"] * 6


def test_real_nix_bursts_with_the_masters_kept_up(farm: Farm) -> None:
    """Builds that start four at a time, each burst after the last shared connection
    expired: without a master kept up some are lost (module docstring); `nixfarm
    ssh-masters`, as the client module runs it, keeps one up and none is."""
    farm.add_client("alice")
    b = farm.add_builder("b1", clients={"alice": "build"}, nix="2.26", max_jobs=4)
    client = NixClient(farm, b, persist=1)
    # The client's own ssh (OpenSSH 10, in the Nix 2.26 root) with the module's block.
    ssh = farm.root / "client-ssh"
    ssh.write_text(
        "#!/bin/sh\nexec " + shlex.join(client.nix.argv(["ssh", "-F", str(client.config)])) + ' "$@"\n'
    )
    ssh.chmod(0o755)
    keeper = subprocess.Popen(
        [farm.nixfarm, "ssh-masters", "--ssh", str(ssh), "b1"], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while not client.master_running():
            if keeper.poll() is not None or time.monotonic() > deadline:
                keeper.terminate()
                raise AssertionError(f"no master came up: {keeper.communicate(timeout=10)[1]}")
            time.sleep(0.2)
        subprocess.run(client.nix.argv(["ssh", "-F", str(client.config), "-O", "exit", "b1"]), timeout=30)
        outcomes = []
        for _ in range(8):
            time.sleep(2.5)  # the keeper has brought a master back after the one it had
            with ThreadPoolExecutor(4) as pool:
                outcomes += list(pool.map(lambda _: client.build("ssh-ng"), range(4)))
        assert outcomes == ["ok"] * 32
        assert b.logins() <= 3, "the builds did not share the kept connection"
    finally:
        keeper.terminate()
        keeper.wait(timeout=10)
