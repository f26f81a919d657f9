"""The modules' pure helpers (modules/lib.nix), evaluated by plain Nix.

modules/lib.nix uses only builtins, so `nix-instantiate --eval` runs it here
without nixpkgs. Inputs travel as JSON in an environment variable, so no test
has to quote Python data as Nix source.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from conftest import NIX_INSTANTIATE, REPO, nix_error, nix_eval

FARM = REPO / "examples" / "farm.nix"

pytestmark = pytest.mark.skipif(
    NIX_INSTANTIATE is None, reason="needs nix-instantiate (tests/run installs nix-bin)"
)

KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG4TkkfLyZz0UD/rdVEdu9f6yclYmfgzEWKwwIyAKeko root@a"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ6YsPIBkTTT2/aBdKKn5jqST+ekPWO6MoJjItL3nQ7L"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEtuygk6jgEaZbrXlkeM2sRIH/l1HPFHvkOAnOCaXrAE"
NIXFARM = "/nix/store/00000000000000000000000000000000-nixfarm-0.1.0"


# Sizes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, 0),
        (12345, 12345),
        ("0", 0),
        ("512", 512),
        ("1K", 1024),
        ("512M", 512 * 2**20),
        ("10G", 10 * 2**30),
        ("007G", 7 * 2**30),
        ("2T", 2 * 2**40),
        ("4194304T", 2**62),
    ],
)
def test_parse_size(size: int | str, expected: int) -> None:
    assert nix_eval("lib.parseSize arg", size) == expected


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("10X", "is not bytes or a number with K, M, G or T"),
        ("10 G", "is not bytes"),
        ("10g", "is not bytes"),
        ("10GiB", "is not bytes"),
        ("", "is not bytes"),
        ("-5", "is not bytes"),
        (-5, "is negative"),
        (1.5, "not a float"),
        ("4194305T", "too large"),
        ("99999999999999999999", "too large"),
    ],
)
def test_bad_size(size: object, message: str) -> None:
    assert message in nix_eval("lib.sizeError arg", size)
    err = nix_error("lib.parseSize arg", size)
    assert "nixfarm: size" in err and message in err


# base64 --------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "f", "fo", "foo", "foob", "fooba", "foobar", HOST_KEY, " ~!"])
def test_base64_matches_python(text: str) -> None:
    assert nix_eval("lib.base64Encode arg", text) == base64.b64encode(text.encode()).decode()


def test_base64_refuses_non_ascii() -> None:
    assert "printable ASCII only" in nix_error("lib.base64Encode arg", "caf\u00e9")


# authorized_keys -------------------------------------------------------------


def test_authorized_keys_line() -> None:
    line = nix_eval(
        "lib.authorizedKeysLine arg",
        {"nixfarm": NIXFARM, "name": "laptop", "role": "build", "publicKey": KEY_A},
    )
    assert line == (f'restrict,command="{NIXFARM}/bin/nixfarm gateway --client laptop --role build" {KEY_A}')


def test_authorized_keys_role_defaults_to_build() -> None:
    line = nix_eval(
        "lib.authorizedKeysLine arg", {"nixfarm": NIXFARM, "name": "ci.1_x-y", "publicKey": KEY_B}
    )
    assert "--client ci.1_x-y --role build" in line


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "-rf"}, "must match"),
        ({"name": "a b"}, "must match"),
        ({"name": "x" * 65}, "must match"),
        ({"name": 'a"'}, "must match"),
        ({"role": "root"}, "is not one of build, metrics, admin"),
        ({"publicKey": 'command="sh" ' + KEY_A}, "is not one OpenSSH public key line"),
        ({"publicKey": KEY_A + "\n" + KEY_B}, "is not one OpenSSH public key line"),
        ({"publicKey": "ssh-ed25519"}, "is not one OpenSSH public key line"),
        ({"publicKey": "ssh-dss AAAAB3"}, "is not one OpenSSH public key line"),
    ],
)
def test_authorized_keys_line_refuses(fields: dict[str, str], message: str) -> None:
    arg = {"nixfarm": NIXFARM, "name": "laptop", "role": "build", "publicKey": KEY_A, **fields}
    err = nix_error("lib.authorizedKeysLine arg", arg)
    assert message in err


# machines file ---------------------------------------------------------------


def test_machines_line_full() -> None:
    builder = {
        "hostName": "big.example.org",
        "sshUser": "farm",
        "protocol": "ssh",
        "systems": ["x86_64-linux", "i686-linux"],
        "sshKey": "/etc/nix/key",
        "maxJobs": 8,
        "speedFactor": 2,
        "features": ["kvm", "big-parallel"],
        "mandatoryFeatures": ["big-parallel", "benchmark"],
        "hostKey": HOST_KEY + " root@big",
    }
    fields = nix_eval("lib.machinesLine arg", builder).split(" ")
    assert fields[:7] == [
        "ssh://farm@big.example.org",
        "x86_64-linux,i686-linux",
        "/etc/nix/key",
        "8",
        "2",
        "kvm,big-parallel,benchmark",  # mandatory ones are supported too
        "big-parallel,benchmark",
    ]
    # The host key, without its comment, as Nix wants it: base64 of the key line.
    assert base64.b64decode(fields[7]).decode() == HOST_KEY
    assert len(fields) == 8


def test_machines_line_defaults() -> None:
    line = nix_eval("lib.machinesLine arg", {"hostName": "b", "systems": ["aarch64-linux"]})
    assert line == "ssh-ng://nixfarm@b aarch64-linux - 1 1 - - -"


def test_known_host_names() -> None:
    assert nix_eval("lib.knownHostNames arg", {"hostName": "b"}) == ["b"]
    assert nix_eval("lib.knownHostNames arg", {"hostName": "b", "address": "192.0.2.1"}) == [
        "b",
        "192.0.2.1",
    ]
    assert nix_eval("lib.knownHostNames arg", {"hostName": "b", "address": "192.0.2.1", "port": 2222}) == [
        "[b]:2222",
        "[192.0.2.1]:2222",
    ]


def test_ssh_host_block() -> None:
    block = nix_eval(
        "lib.sshHostBlock arg",
        {
            "builder": {"hostName": "b", "address": "192.0.2.1", "port": 2222},
            "sshKey": "/etc/nix/key",
            "connectTimeout": 5,
        },
    )
    lines = block.splitlines()
    assert lines[0] == "Host b"
    assert {line.strip() for line in lines[1:]} == {
        "HostName 192.0.2.1",
        "Port 2222",
        "User nixfarm",
        "IdentityFile /etc/nix/key",
        "IdentitiesOnly yes",
        "ConnectTimeout 5",
        "ServerAliveInterval 60",
        "ServerAliveCountMax 3",
    }
    assert all(line.startswith("  ") for line in lines[1:])
    assert "Control" not in block  # connection sharing is off unless asked for


def ssh_settings(config: Path, host: str, as_nobody: bool = False) -> dict[str, str]:
    """What the real OpenSSH client makes of `config` for `host` (`ssh -G`), as root or nobody."""
    argv = ["ssh", "-G", "-F", str(config), host]
    if as_nobody:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout
    return dict(line.partition(" ")[::2] for line in out.splitlines())


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ssh") is None, reason="needs root and OpenSSH's ssh")
def test_ssh_host_block_shares_connections_for_root_only() -> None:
    block = nix_eval(
        "lib.sshHostBlock arg",
        {
            "builder": {"hostName": "b", "address": "192.0.2.1"},
            "sshKey": "/etc/nix/key",
            "controlDir": "/run/nixfarm-ssh",
            "controlPersist": 90,
        },
    )
    # Not in pytest's tmp_path: its parent is root's only, and nobody must read the file too.
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:
        config = Path(directory) / "ssh_config"
        config.write_text(block + "\n")
        Path(directory).chmod(0o755)
        config.chmod(0o644)  # ssh refuses a config others may write
        check_sharing_for_root_only(config)


def check_sharing_for_root_only(config: Path) -> None:
    # Root's ssh (nix-daemon's), under the name Nix gives it: one connection per builder.
    root = ssh_settings(config, "b")
    assert root["hostname"] == "192.0.2.1"
    assert root["controlmaster"] == "auto"
    assert root["controlpersist"] == "90"
    path = root["controlpath"]
    # %C, a hash: well under the 107 bytes a socket path may have
    assert path.startswith("/run/nixfarm-ssh/") and len(path) < 100
    # Anyone else's ssh would find the directory closed to it, and ssh exits when it
    # cannot make its socket: no sharing for them.
    assert ssh_settings(config, "b", as_nobody=True)["controlmaster"] == "false"
    # Nor for a name the block is not about (the address itself, another host).
    assert ssh_settings(config, "192.0.2.1")["controlmaster"] == "false"


# inventory checks ------------------------------------------------------------


def test_example_farm_is_clean() -> None:
    assert nix_eval(f"lib.checkInventory (import {FARM})") == []


def good_farm() -> dict[str, Any]:
    return {
        "clients": {"laptop": {"publicKey": KEY_A}, "ci": {"publicKey": KEY_B, "role": "admin"}},
        "builders": {
            "big": {
                "hostName": "big.example.org",
                "hostKey": HOST_KEY,
                "systems": ["x86_64-linux"],
                "minFree": "10G",
                "maxFree": "50G",
            }
        },
    }


def test_good_farm_is_clean() -> None:
    assert nix_eval("lib.checkInventory arg", good_farm()) == []


def check(change: dict[str, Any]) -> list[str]:
    """Errors of good_farm() with `change` merged into its entries."""
    farm = good_farm()
    for kind, entries in change.items():
        for name, fields in entries.items():
            farm[kind].setdefault(name, {}).update(fields)
    return list(nix_eval("lib.checkInventory arg", farm))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"builders": {"big": {"minFree": "50G"}}},
            'services.nixfarm.farm.builders."big": minFree (50G) must be below maxFree (50G)',
        ),
        (
            {"builders": {"big": {"minFree": "1T", "maxFree": 1024}}},
            "minFree (1T) must be below maxFree (1024)",
        ),
        ({"builders": {"big": {"maxFree": "lots"}}}, '.maxFree: size "lots" is not bytes'),
        ({"builders": {"big": {"systems": []}}}, '"big".systems is empty'),
        ({"builders": {"big": {"hostName": ""}}}, '"big".hostName is empty'),
        ({"builders": {"big": {"protocol": "http"}}}, '.protocol: "http" is not "ssh-ng" or "ssh"'),
        ({"builders": {"big": {"maxJobs": 0}}}, ".maxJobs must be at least 1"),
        ({"builders": {"big": {"speedFactor": 0}}}, ".speedFactor must be positive"),
        ({"builders": {"big": {"sshUser": "a b"}}}, '.sshUser: "a b" is not a valid user name'),
        ({"builders": {"big": {"hostKey": "AAAA"}}}, '"big".hostKey is not one OpenSSH public key'),
        ({"clients": {"laptop": {"role": "root"}}}, '"laptop".role: "root" is not one of'),
        ({"clients": {"laptop": {"publicKey": "x"}}}, '"laptop".publicKey is not one OpenSSH'),
        ({"clients": {"bad name": {"publicKey": KEY_A + "x"}}}, '"bad name": the name must match'),
        (
            {"clients": {"ci": {"publicKey": KEY_A + " other comment"}}},
            "is listed for more than one client",
        ),
        (
            {"builders": {"twin": {"hostName": "big.example.org", "hostKey": HOST_KEY, "systems": ["x"]}}},
            "host name big.example.org is used by more than one builder",
        ),
    ],
)
def test_bad_farm(change: dict[str, Any], expected: str) -> None:
    errors = check(change)
    assert any(expected in e for e in errors), errors


def test_missing_fields_are_reported_not_crashed() -> None:
    errors = nix_eval("lib.checkInventory arg", {"clients": {"x": {}}, "builders": {"y": {}}})
    assert any('"x".publicKey must be a string' in e for e in errors), errors
    assert any('"y".hostName is empty' in e for e in errors), errors
    assert any('"y".systems is empty' in e for e in errors), errors
    assert any('"y".hostKey must be a string' in e for e in errors), errors
