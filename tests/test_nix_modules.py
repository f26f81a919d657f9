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

from conftest import REPO

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
        "share_client_names",
        "prometheus_listen",
    }
    settings = facts["builder"]["agentSettings"]
    assert set(settings) <= known
    # Off by default: no other client's names for metrics keys, no HTTP endpoint.
    assert settings["share_client_names"] is False and settings["prometheus_listen"] == ""
    assert "AF_INET" not in facts["builder"]["agent"]["serviceConfig"]["RestrictAddressFamilies"]
    assert settings["state_dir"] == "/var/lib/nixfarm"
    # Admin keys reach the agent's control socket as the builder user.
    assert settings["control_group"] == facts["builder"]["user"]["group"] == "nixfarm"
    # min-free / max-free stay in nix.conf only; the agent reads them there.
    assert "min_free" not in settings and "max_free" not in settings
    assert settings["nix_bin_dir"].startswith("/nix/store/") and settings["nix_bin_dir"].endswith("/bin")


def test_builder_prometheus_endpoint(facts: dict[str, Any]) -> None:
    endpoint = facts["prometheus"]
    assert endpoint["failedAssertions"] == []
    assert endpoint["settings"]["prometheus_listen"] == "[::]:9100"  # IPv6 in brackets
    assert endpoint["settings"]["share_client_names"] is True
    assert 9100 in endpoint["firewall"]  # (beside sshd's 22)
    assert {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"} == set(endpoint["addressFamilies"])


# trust ----------------------------------------------------------------------------


def test_untrusted_builders_trust_only_the_clients_signing_keys(facts: dict[str, Any]) -> None:
    untrusted = facts["untrusted"]
    assert untrusted["default"] == "untrusted"  # the mode a farm gets unless it says otherwise
    builder = untrusted["builder"]
    assert builder["failedAssertions"] == [] and builder["warnings"] == []
    conf = conf_lines(builder["nixConf"])
    assert conf["trusted-users"].split() == ["root"]  # not the builder user
    assert set(conf["extra-trusted-public-keys"].split()) == {
        "laptop-nixfarm-1:2C9lbTZtH4OgLE2mvlBlOhUiFqFQyLGLqMhylVeUvhE=",
        "ci-nixfarm-1:6/rle0MoXo/hrWuf40UuuKT8IDamFEgUHa9YcRCApgM=",
    }
    assert conf["trusted-public-keys"].startswith("cache.nixos.org-1:")  # the caches' keys stay
    # Trusted (the example farm's mode): the builder user is a trusted user, no client keys.
    trusted = conf_lines(untrusted["trustedBuilderConf"])
    assert set(trusted["trusted-users"].split()) == {"root", "nixfarm"}
    assert "extra-trusted-public-keys" not in trusted


def test_untrusted_clients_sign_with_a_key_made_at_boot(facts: dict[str, Any]) -> None:
    client = facts["untrusted"]["client"]
    assert client["failedAssertions"] == [] and client["warnings"] == []
    conf = conf_lines(client["nixConf"])
    assert conf["secret-key-files"] == "/var/lib/nixfarm-client/signing-key"
    # What remote builds send back is signed too, for the next untrusted builder.
    assert conf["post-build-hook"].endswith("/bin/nixfarm-sign-outputs")
    unit = client["signingUnit"]
    assert unit["Type"] == "oneshot" and unit["RemainAfterExit"] is True
    assert unit["before"] == ["nix-daemon.service"] and unit["requiredBy"] == ["nix-daemon.service"]
    if unit["script"]:  # the script's text, where the stand-in for pkgs keeps it
        assert "--generate-binary-cache-key" in unit["script"] and " laptop-nixfarm-1 " in unit["script"]
        assert "umask 077" in unit["script"]
    if client["inventory"] is not None:
        inventory = json.loads(client["inventory"])
        assert inventory["trust"] == "untrusted"
        assert inventory["signing_key_file"] == "/var/lib/nixfarm-client/signing-key"


def test_untrusted_mode_names_what_is_missing(facts: dict[str, Any]) -> None:
    untrusted = facts["untrusted"]
    (warning,) = untrusted["unsignedWarnings"]
    assert "services.nixfarm.farm.clients: ci have no signingKey" in warning
    ssh = " ".join(" ".join(untrusted["sshBuilderClient"]).split())
    assert 'small use protocol "ssh": an untrusted builder refuses' in ssh
    for failed in (untrusted["oldNixBuilder"], untrusted["oldNixClient"]):
        message = "\n".join(failed)
        assert "Nix is 2.15.3" in message and "2.16" in message
        assert 'services.nixfarm.farm.trust = "trusted"' in message


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


def test_client_machines_file_lists_a_supported_and_mandatory_feature_once(facts: dict[str, Any]) -> None:
    machines = facts["overlap"]["machines"]
    assert sorted(machines.splitlines()) == sorted(facts["overlap"]["expectedMachines"].splitlines())
    big = next(line for line in machines.splitlines() if "big.example.org" in line).split()
    assert big[5:7] == ["kvm,nixos-test,benchmark,big-parallel", "big-parallel"]


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
        "ConnectTimeout 10",
    ]:
        assert f"  {line}\n" in block + "\n", line
    # connectionSharing, on by default: for root's ssh (nix-daemon's) only, by the name Nix uses.
    sharing = block[block.index("Match ") :]
    assert sharing.splitlines()[0] == "Match originalhost small.example.org localuser root"
    for line in ["ControlMaster auto", "ControlPath /run/nixfarm-ssh/%C", "ControlPersist 60"]:
        assert f"  {line}\n" in sharing + "\n", line
    assert "d /run/nixfarm-ssh 0700 root root - -" in facts["client"]["tmpfiles"]
    # A master to every builder kept up, so that builds starting at once do not race to be it.
    masters = facts["client"]["masters"]
    argv = masters["ExecStart"].split()
    assert argv[1:3] == ["ssh-masters", "--ssh"] and argv[3].endswith("/bin/ssh")
    assert sorted(argv[4:]) == ["big.example.org", "small.example.org"]
    assert masters["Restart"] == "always" and masters["ReadWritePaths"] == ["/run/nixfarm-ssh"]
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
    ]
    # nix.package is CppNix here: only its slot lock names are held.
    assert facts["client"]["dispatcherEnvironment"]["NIXFARM_LOCK_NAMES"] == "nix"
    assert "nixfarm-seed-machines" in service["ExecStartPre"]
    # However it stops, Nix goes back to the static lines (the dispatcher's rely on its locks).
    assert service["ExecStopPost"] == service["ExecStartPre"]
    # It holds slot locks where Nix's build hook counts load (docs/client.md, "How Nix is told").
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


# the VM tests' nodes ------------------------------------------------------------

VM_FACTS = REPO / "tests" / "nix" / "vm-node-facts.nix"


@pytest.fixture(scope="module")
def vm_nodes() -> dict[str, dict[str, Any]]:
    """Every node of every VM test, evaluated (tests/nix/vm-node-facts.nix), by test."""
    assert NIX_INSTANTIATE is not None
    proc = subprocess.run(
        [NIX_INSTANTIATE, "--eval", "--strict", "--json", str(VM_FACTS), "--argstr", "nixpkgs", NIXPKGS],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return dict(json.loads(proc.stdout))


def vm_nodes_of(vm_nodes: dict[str, dict[str, Any]], role: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, node) for every VM test node of that role."""
    return [
        (f"nixos-tests/{test}.nix node {name}", node)
        for test, nodes in vm_nodes.items()
        for name, node in nodes.items()
        if node["roles"] == [role]
    ]


def test_every_vm_test_node_evaluates_cleanly(vm_nodes: dict[str, dict[str, Any]]) -> None:
    names = (REPO / "nixos-tests" / "names.nix").read_text()
    assert set(vm_nodes) == set(re.findall(r'^\s*"([a-z-]+)"$', names, re.MULTILINE))
    for test, nodes in vm_nodes.items():
        assert nodes, f"{test}: no nodes"
        for name, node in nodes.items():
            where = f"nixos-tests/{test}.nix node {name}"
            assert node["failedAssertions"] == [], where
            assert node["warnings"] == [], where
            assert len(node["roles"]) == 1, f"{where}: roles {node['roles']}"
            # No node waits on a binary cache the VMs cannot reach.
            assert conf_lines(node["nixConf"])["substituters"] == "", where


def test_vm_test_builders_have_their_pinned_host_key(vm_nodes: dict[str, dict[str, Any]]) -> None:
    builders = vm_nodes_of(vm_nodes, "builder")
    assert builders
    for where, node in builders:
        name = where.rsplit(" ", 1)[1]
        assert node["builderName"] == name, where
        # A copy readable by root only, of the key farm.nix pins for this builder.
        assert node["etc"]["ssh/ssh_host_ed25519_key"] == {"mode": "0600", "source": f"{name}_host"}, where
        assert "nix/nixfarm_ed25519" not in node["etc"], where
        argv = node["execStart"]["nixfarm-agent"].split()
        assert argv[1:4] == ["--config", "/etc/nixfarm/agent.json", "agent"], where
        # The VM farm leaves `trust` at its default: the builder user is not a trusted Nix user.
        assert conf_lines(node["nixConf"])["trusted-users"] == "root", where


def test_vm_test_clients_have_their_keys_and_never_build_locally(vm_nodes: dict[str, dict[str, Any]]) -> None:
    clients = vm_nodes_of(vm_nodes, "client")
    assert clients
    for where, node in clients:
        for file, key in [
            ("nix/nixfarm_ed25519", "client"),
            ("nixfarm-test/monitor_ed25519", "monitor"),
            ("nixfarm-test/ops_ed25519", "ops"),
        ]:
            assert node["etc"][file] == {"mode": "0600", "source": key}, f"{where}: {file}"
        assert "ssh/ssh_host_ed25519_key" not in node["etc"], where
        assert conf_lines(node["nixConf"])["max-jobs"] == "0", where
        lines = node["machines"].splitlines()
        assert lines and all(line.startswith("ssh-ng://nixfarm@builder") for line in lines), where
    # The tests that turn the dispatcher off read Nix's static list; the others run it.
    assert "nixfarm-dispatch" not in vm_nodes["gateway"]["client"]["execStart"]
    assert "nixfarm-dispatch" in vm_nodes["offload"]["client"]["execStart"]
