"""The NixOS modules, evaluated in the example machines with nixpkgs' eval-config.nix.

Needs a nixpkgs tree (env NIXPKGS, e.g. the flake's pinned input: `nix flake
archive --json` prints its path) and a Nix new enough for it; without one
every test here is skipped, saying so. The facts come from one evaluation,
tests/nix/example-facts.nix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
FACTS = REPO / "tests" / "nix" / "example-facts.nix"
NIXPKGS = os.environ.get("NIXPKGS", "")
NIX_INSTANTIATE = shutil.which("nix-instantiate")
GiB = 2**30

# tests/conftest.py (owned elsewhere) does not register this marker yet; until
# it does, keep pytest from warning about it. It marks the tests that CI may
# skip because they need a nixpkgs checkout.
warnings.filterwarnings("ignore", r"Unknown pytest\.mark\.needs_nixpkgs", pytest.PytestUnknownMarkWarning)


def _missing() -> str | None:
    if not NIXPKGS:
        return "needs env NIXPKGS pointing at a nixpkgs tree (to evaluate NixOS modules)"
    if not (Path(NIXPKGS) / "nixos" / "lib" / "eval-config.nix").is_file():
        return f"NIXPKGS={NIXPKGS} has no nixos/lib/eval-config.nix"
    if NIX_INSTANTIATE is None:
        return "needs nix-instantiate"
    return None


pytestmark = [
    pytest.mark.needs_nixpkgs,
    pytest.mark.skipif(_missing() is not None, reason=_missing() or ""),
]


@pytest.fixture(scope="module")
def facts() -> dict[str, Any]:
    """The examples' generated configuration, from one nix-instantiate run."""
    assert NIX_INSTANTIATE is not None
    proc = subprocess.run(
        [
            NIX_INSTANTIATE,
            "--eval",
            "--strict",
            "--json",
            str(FACTS),
            "--argstr",
            "nixpkgs",
            NIXPKGS,
        ],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return dict(json.loads(proc.stdout))


def conf_lines(text: str) -> dict[str, str]:
    """nix.conf as key -> value."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            out[key.strip()] = value.strip()
    return out


# builder ---------------------------------------------------------------------


def test_builder_evaluates_cleanly(facts: dict[str, Any]) -> None:
    assert facts["builder"]["failedAssertions"] == []
    assert facts["builder"]["warnings"] == []


def test_builder_nix_conf(facts: dict[str, Any]) -> None:
    conf = conf_lines(facts["builder"]["nixConf"])
    # examples/farm.nix: big has minFree 20G, maxFree 100G, 8 jobs, 4 cores.
    assert conf["min-free"] == str(20 * GiB)
    assert conf["max-free"] == str(100 * GiB)
    assert conf["max-jobs"] == "8"
    assert conf["cores"] == "4"
    assert set(conf["trusted-users"].split()) == {"root", "nixfarm"}
    assert set(conf["system-features"].split()) == {
        "big-parallel",
        "kvm",
        "nixos-test",
        "benchmark",
    }
    assert facts["builder"]["nrBuildUsers"] == 8


def test_builder_user(facts: dict[str, Any]) -> None:
    user = facts["builder"]["user"]
    assert user["name"] == "nixfarm"
    assert user["isSystemUser"] and user["useDefaultShell"]
    assert user["hashedPassword"] == "*"
    assert user["group"] == "nixfarm"


def test_builder_authorized_keys(facts: dict[str, Any]) -> None:
    package = facts["builder"]["package"]
    keys = sorted(facts["builder"]["user"]["authorizedKeys"])
    gateway = f"{package}/bin/nixfarm gateway"
    assert keys == [
        f'restrict,command="{gateway} --client ci --role admin" ssh-ed25519 '
        "AAAAC3NzaC1lZDI1NTE5AAAAIJ6YsPIBkTTT2/aBdKKn5jqST+ekPWO6MoJjItL3nQ7L root@ci",
        f'restrict,command="{gateway} --client laptop --role build" ssh-ed25519 '
        "AAAAC3NzaC1lZDI1NTE5AAAAIG4TkkfLyZz0UD/rdVEdu9f6yclYmfgzEWKwwIyAKeko root@laptop",
    ]
    file_lines = [ln for ln in facts["builder"]["authorizedKeysFile"].splitlines() if ln.strip()]
    assert sorted(file_lines) == keys


def test_builder_sshd_match_block(facts: dict[str, Any]) -> None:
    assert facts["builder"]["opensshEnabled"]
    config = facts["builder"]["sshdExtraConfig"]
    block = config[config.index("Match User nixfarm") :].splitlines()
    settings = {line.split()[0]: line.split()[1] for line in block[1:] if line.strip()}
    assert settings["PermitTTY"] == "no"
    assert settings["DisableForwarding"] == "yes"
    assert settings["AllowTcpForwarding"] == "no"
    assert settings["PasswordAuthentication"] == "no"
    assert settings["AuthenticationMethods"] == "publickey"


def test_builder_nix_daemon_limits(facts: dict[str, Any]) -> None:
    service = facts["builder"]["nixDaemon"]
    assert service["MemoryMax"] == "90%"
    assert service["OOMScoreAdjust"] == 500
    assert service["OOMPolicy"] == "continue"  # a build killed at MemoryMax must not stop the daemon
    assert service["MemoryAccounting"] is True
    assert "MemoryHigh" not in service  # null: left unset


def test_builder_agent_unit(facts: dict[str, Any]) -> None:
    agent = facts["builder"]["agent"]
    service = agent["serviceConfig"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert re.fullmatch(r"\d+s", service["WatchdogSec"])
    assert service["Restart"] == "on-failure"
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_CHOWN"]
    assert service["ReadWritePaths"] == ["/nix/var/nix/db"]  # not /nix/store: nix-daemon deletes
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged", "@chown"]
    assert service["StateDirectory"] == "nixfarm"
    argv = service["ExecStart"].split()
    assert argv[0] == facts["builder"]["package"] + "/bin/nixfarm"
    assert argv[1:] == ["--config", "/etc/nixfarm/agent.json", "agent", "--interval", "10"]
    assert agent["wantedBy"] == ["multi-user.target"]
    assert agent["environment"]["NIXFARM_CONFIG"] == "/etc/nixfarm/agent.json"
    assert agent["environment"]["NIX_REMOTE"] == "daemon"
    # The GC runs nix-store from PATH: the system's Nix must be there.
    assert any(re.search(r"/nix/store/[^/]+-nix-\d", p) for p in agent["path"])


def test_builder_agent_config_has_only_agent_keys(facts: dict[str, Any]) -> None:
    known = {
        "store_dir",
        "state_dir",
        "nix_conf_dir",
        "build_users_group",
        "nix_daemon_unit",
        "nix_bin_dir",
        "gateway_log",
        "network_interfaces",
        "stream_max_seconds",
        "min_free",
        "max_free",
        "gc_check_interval",
        "usage_sample_interval",
        "control_group",
    }
    settings = facts["builder"]["agentSettings"]
    assert set(settings) <= known
    assert settings["state_dir"] == "/var/lib/nixfarm"
    # Admin keys reach the agent's control socket as the builder user.
    assert settings["control_group"] == facts["builder"]["user"]["group"] == "nixfarm"
    # min-free / max-free stay in nix.conf only; the agent reads them there.
    assert "min_free" not in settings and "max_free" not in settings
    assert settings["nix_bin_dir"].startswith("/nix/store/") and settings["nix_bin_dir"].endswith("/bin")


# client ----------------------------------------------------------------------


def test_client_evaluates_cleanly(facts: dict[str, Any]) -> None:
    assert facts["client"]["failedAssertions"] == []
    assert facts["client"]["warnings"] == []


def test_client_machines_file(facts: dict[str, Any]) -> None:
    machines = facts["client"]["machines"]
    # nixpkgs' rendering of nix.buildMachines matches our own machinesLine.
    assert sorted(machines.splitlines()) == sorted(facts["client"]["expectedMachines"].splitlines())
    big = next(line for line in machines.splitlines() if "big.example.org" in line).split()
    assert big[:7] == [
        "ssh-ng://nixfarm@big.example.org",
        "x86_64-linux,i686-linux",
        "/etc/nix/nixfarm_ed25519",
        "8",
        "2",
        "big-parallel,kvm,nixos-test,benchmark",
        "-",
    ]


def test_client_nix_conf(facts: dict[str, Any]) -> None:
    conf = conf_lines(facts["client"]["nixConf"])
    assert conf["builders"] == "@/var/lib/nixfarm-client/machines"
    assert conf["builders-use-substitutes"] == "true"
    assert facts["client"]["distributedBuilds"] is True


def test_client_ssh_config(facts: dict[str, Any]) -> None:
    ssh = facts["client"]["sshConfig"]
    block = ssh[ssh.index("Host small.example.org") :].split("\nHost ")[0]
    for line in [
        "HostName 192.0.2.20",
        "User nixfarm",
        "IdentityFile /etc/nix/nixfarm_ed25519",
        "ServerAliveInterval 60",
        "ServerAliveCountMax 3",
        "IPQoS throughput",
        "ConnectTimeout 10",
    ]:
        assert f"  {line}\n" in block + "\n", line
    # connectionSharing, on by default: for root's ssh (nix-daemon's) only, by the name Nix uses.
    sharing = block[block.index("Match ") :]
    assert sharing.splitlines()[0] == "Match originalhost small.example.org localuser root"
    for line in ["ControlMaster auto", "ControlPath /run/nixfarm-ssh/%C", "ControlPersist 60"]:
        assert f"  {line}\n" in sharing + "\n", line
    assert "d /run/nixfarm-ssh 0700 root root - -" in facts["client"]["tmpfiles"]
    # Our Host blocks come before nixpkgs' generated `Host *` section.
    assert ssh.index("Host small.example.org") < ssh.index("Host *")


def test_client_known_hosts(facts: dict[str, Any]) -> None:
    lines = facts["client"]["knownHosts"].splitlines()
    assert (
        "small.example.org,192.0.2.20 ssh-ed25519 "
        "AAAAC3NzaC1lZDI1NTE5AAAAIIVD/QeH8VBuzO9P38u8/KHoysiLVjYoRcWxo75QwzE3" in lines
    )
    assert any(line.startswith("big.example.org ssh-ed25519 ") for line in lines)


def test_client_dispatcher_unit(facts: dict[str, Any]) -> None:
    service = facts["client"]["dispatcher"]
    argv = service["ExecStart"].split()
    assert argv[0].endswith("/bin/nixfarm")
    assert argv[1:] == [
        "dispatch",
        "--inventory",
        "/etc/nixfarm/inventory.json",
        "--machines",
        "/var/lib/nixfarm-client/machines",
        "--build-poll-interval",
        "1",
        "--lock-names",  # nix.package is CppNix here: only its slot lock names are held
        "nix",
    ]
    assert "nixfarm-seed-machines" in service["ExecStartPre"]
    # However it stops, Nix goes back to the static lines (the dispatcher's rely on its locks).
    assert service["ExecStopPost"] == service["ExecStartPre"]
    # It holds slot locks where Nix's build hook counts load (README "How Nix is told").
    assert service["ReadWritePaths"] == ["/var/lib/nixfarm-client", "/nix/var/nix/current-load"]
    assert "d /nix/var/nix/current-load 0755 root root - -" in facts["client"]["tmpfiles"]
    inventory = facts["client"]["inventory"]
    if inventory is not None:  # the JSON text, where pkgs.formats.json exposes it
        data = json.loads(inventory)
        assert data["client"] == {"name": "laptop", "key_file": "/etc/nix/nixfarm_ed25519"}
        assert {b["name"] for b in data["builders"]} == {"big", "small"}


# broken configurations ---------------------------------------------------------


def test_client_without_key_or_builders_is_refused(facts: dict[str, Any]) -> None:
    messages = "\n".join(facts["broken"]["client"])
    assert "services.nixfarm.client.sshKey is not set" in messages
    assert "services.nixfarm.client has no builders" in messages
    assert "services.nixfarm.client.builders lists nosuch" in messages


def test_builder_misconfigurations_are_refused(facts: dict[str, Any]) -> None:
    messages = "\n".join(facts["broken"]["builder"])
    assert 'services.nixfarm.builder.name is "nosuch"' in messages
    assert "services.nixfarm.builder.minFree (200G) must be below" in messages
    assert 'services.nixfarm.farm.builders."big": minFree (1T) must be below maxFree' in messages
