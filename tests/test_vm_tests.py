"""The NixOS VM tests (nixos-tests/), checked here, where they cannot run.

They need KVM and nixpkgs (`nix flake check`); this machine has neither.
What can be checked without them is checked: the flake's checks come from
nixos-tests/default.nix, every test named there has its files, every node
imports the flake's own modules and enables its role instead of copying
their configuration, and every test script (helpers.py + <test>.py, exactly
the string the driver gets, read from the Nix evaluation) compiles, passes
pyflakes' checks with the driver's names declared, and type-checks with
mypy against stubs of the driver's API, as the driver does before it boots
a VM. The test keys in nixos-tests/keys/ match farm.nix.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import HERE, REPO

VM_TESTS = REPO / "nixos-tests"
STUBS = HERE / "vm_driver_stubs"
NIX_INSTANTIATE = shutil.which("nix-instantiate")
BIN = Path(sys.executable).parent


def _tool(name: str) -> str | None:
    """A lint tool from this Python's environment (the lint extra), else from PATH."""
    here = BIN / name
    return str(here) if here.exists() else shutil.which(name)


RUFF = _tool("ruff")
MYPY = _tool("mypy")

# The names the test driver gives every script (test_driver/driver.py,
# Driver.test_symbols), besides the machines.
DRIVER_SYMBOLS = [
    "start_all",
    "test_script",
    "machines",
    "vlans",
    "driver",
    "log",
    "os",
    "create_machine",
    "subtest",
    "run_tests",
    "join_all",
    "retry",
    "serial_stdout_off",
    "serial_stdout_on",
    "polling_condition",
    "Machine",
    "t",
]

# Typed declarations of those names, put before the script for mypy, like the
# driver's own nixos/lib/test-script-prepend.py (same imports, so a script's
# imports must not clash with them); the machines follow as `name: Machine`.
PRELUDE = """\
from test_driver.driver import Driver
from test_driver.vlan import VLan
from test_driver.machine import Machine
from test_driver.logger import Logger
from typing import Callable, Iterator, ContextManager, Optional, List, Dict, Any, Union
from typing_extensions import Protocol
from pathlib import Path

start_all: Callable[[], None]
subtest: Callable[[str], ContextManager[None]]
retry: Callable[..., None]
test_script: Callable[[], None]
machines: List[Machine]
vlans: List[VLan]
driver: Driver
log: Logger
create_machine: Callable[..., Machine]
run_tests: Callable[[], None]
join_all: Callable[[], None]
serial_stdout_off: Callable[[], None]
serial_stdout_on: Callable[[], None]
polling_condition: Callable[..., Any]
"""

# Evaluates nixos-tests/default.nix as the flake does, with a stand-in for
# nixpkgs that records each runNixOSTest call instead of building it: the
# test's name, its script, and each node's imports and enabled roles.
DESCRIBE = r"""
{ repo }:
let
  self.nixosModules = {
    builder = "flake:nixosModules.builder";
    client = "flake:nixosModules.client";
    default = "flake:nixosModules.default";
  };
  pkgs = {
    lib = {
      genAttrs = names: f: builtins.listToAttrs (map (name: { inherit name; value = f name; }) names);
      optionalAttrs = cond: attrs: if cond then attrs else { };
    };
    stdenv.hostPlatform.system = "x86_64-linux";
    testers.runNixOSTest = test: { vmTest = test; };
    nixosOptionsDoc = args: { optionsJSON.optionDocs = true; };
  };
  checks = import (repo + "/nixos-tests") { inherit pkgs self; };
  show = x: if builtins.isPath x then "path:" + baseNameOf x else x;
  stub = { config = throw "config"; lib = throw "lib"; pkgs = throw "pkgs"; options = throw "options"; };
  node = m:
    let m' = if builtins.isFunction m then m stub else m;
    in {
      imports = map show (m'.imports or [ ]);
      builder = m'.services.nixfarm.builder.enable or false;
      client = m'.services.nixfarm.client.enable or false;
    };
  describe = value:
    if value ? vmTest then {
      vm = true;
      inherit (value.vmTest) name testScript;
      nodes = builtins.mapAttrs (_: node)
        (builtins.foldl' (acc: m: acc // (m.nodes or { })) { } value.vmTest.imports);
    } else { vm = false; };
in
builtins.mapAttrs (_: describe) checks
"""

# What the modules set and a test node must get from them, never set itself.
MODULE_OWNED = [
    "authorizedKeys",
    "buildMachines",
    "distributedBuilds",
    "knownHosts",
    "trusted-users",
    "nrBuildUsers",
    "builders-use-substitutes",
    "programs.ssh.extraConfig",
    "services.openssh",
    "users.users",
    "systemd.services",
    "nixfarm/agent.json",
    "nixfarm/inventory.json",
]

pytestmark = pytest.mark.skipif(
    NIX_INSTANTIATE is None, reason="needs nix-instantiate (tests/run installs nix-bin)"
)


@pytest.fixture(scope="module")
def checks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """nixos-tests/default.nix's checks, described (see DESCRIBE)."""
    assert NIX_INSTANTIATE is not None
    expr = tmp_path_factory.mktemp("describe") / "describe.nix"
    expr.write_text(DESCRIBE)
    proc = subprocess.run(
        [NIX_INSTANTIATE, "--eval", "--strict", "--json", str(expr), "--arg", "repo", str(REPO)],
        check=False,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def vm_tests(checks: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in checks.items() if value["vm"]}


def test_flake_checks_come_from_nixos_tests() -> None:
    flake = (REPO / "flake.nix").read_text()
    assert "import ./nixos-tests { inherit pkgs self; }" in flake
    assert "checks.x86_64-linux" in (VM_TESTS / "README.md").read_text()


def test_the_issue_s_tests_are_all_there(checks: dict[str, Any]) -> None:
    assert set(vm_tests(checks)) == {"offload", "gateway", "failover", "gc", "memory-cap"}
    # The option docs of nixfarm's modules, with warnings as errors.
    assert "option-docs" in checks


def test_every_vm_test_has_its_files(checks: dict[str, Any]) -> None:
    for name, test in vm_tests(checks).items():
        assert test["name"] == name
        assert (VM_TESTS / f"{name}.nix").is_file(), f"{name}: no nixos-tests/{name}.nix"
        assert (VM_TESTS / f"{name}.py").is_file(), f"{name}: no nixos-tests/{name}.py"
        script = (VM_TESTS / "helpers.py").read_text() + "\n" + (VM_TESTS / f"{name}.py").read_text()
        assert test["testScript"] == script, f"{name}: the driver would not get helpers.py + {name}.py"


def test_every_node_imports_the_flake_modules(checks: dict[str, Any]) -> None:
    for name, test in vm_tests(checks).items():
        assert test["nodes"], f"{name}: no nodes"
        for node_name, node in test["nodes"].items():
            where = f"{name}: node {node_name}"
            imports = node["imports"]
            assert "path:node.nix" in imports, f"{where} does not import node.nix"
            roles = [role for role in ("builder", "client") if node[role]]
            assert len(roles) == 1, f"{where} enables {roles or 'no role'}"
            role = roles[0]
            flake_module = {f"flake:nixosModules.{role}", "flake:nixosModules.default"}
            assert flake_module & set(imports), f"{where} enables the {role} role without the flake's module"
            assert not [i for i in imports if i.startswith("path:") and i != "path:node.nix"], (
                f"{where} imports other files: {imports}"
            )


def test_nodes_do_not_copy_what_the_modules_configure() -> None:
    for path in sorted(VM_TESTS.glob("*.nix")):
        code = "\n".join(
            line.split("#", 1)[0] for line in path.read_text().splitlines()
        )  # settings, not comments
        for owned in MODULE_OWNED:
            assert owned not in code, f"{path.name} sets {owned}, which the modules configure"


def _scripts(checks: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    return [
        (name, test["testScript"], sorted(test["nodes"])) for name, test in sorted(vm_tests(checks).items())
    ]


def test_scripts_compile(checks: dict[str, Any]) -> None:
    for name, script, _ in _scripts(checks):
        compile(script, f"nixos-tests/{name} (helpers.py + {name}.py)", "exec")


def test_scripts_use_subtests_and_typed_helpers(checks: dict[str, Any]) -> None:
    for name, _script, _ in _scripts(checks):
        own = (VM_TESTS / f"{name}.py").read_text()
        assert "with subtest(" in own, f"{name}.py has no subtest blocks"
        assert "start_all()" in own
    helpers = (VM_TESTS / "helpers.py").read_text()
    for match in re.finditer(r"^def (\w+)\((.*?)\)( -> [^:]+)?:", helpers, re.MULTILINE | re.DOTALL):
        assert match.group(3), f"helpers.py: {match.group(1)} has no return type"


@pytest.mark.skipif(RUFF is None, reason="needs ruff (pip install -e 'agent[lint]')")
def test_scripts_pass_pyflakes_checks_with_the_driver_s_names(checks: dict[str, Any], tmp_path: Path) -> None:
    """What the driver's pyflakes run checks (undefined names, unused
    variables, ...), on the whole script, with the driver's globals declared."""
    assert RUFF is not None
    for name, script, nodes in _scripts(checks):
        file = tmp_path / f"{name.replace('-', '_')}.py"
        file.write_text(script)
        builtins = json.dumps(DRIVER_SYMBOLS + nodes)
        proc = subprocess.run(
            [RUFF, "check", "--isolated", "--select", "F", "--config", f"builtins = {builtins}", str(file)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, f"{name}:\n{proc.stdout}{proc.stderr}"


def test_scripts_follow_the_project_s_ruff_settings() -> None:
    if RUFF is None:
        pytest.skip("needs ruff (pip install -e 'agent[lint]')")
    proc = subprocess.run(
        [RUFF, "check", str(VM_TESTS)], check=False, capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(MYPY is None, reason="needs mypy (pip install -e 'agent[lint]')")
def test_scripts_type_check_against_the_driver_api(checks: dict[str, Any], tmp_path: Path) -> None:
    assert MYPY is not None
    for name, script, nodes in _scripts(checks):
        file = tmp_path / f"{name.replace('-', '_')}.py"
        hints = "".join(f"{node}: Machine\n" for node in nodes)
        file.write_text(PRELUDE + hints + script)
        proc = subprocess.run(
            [
                MYPY,
                "--no-implicit-optional",
                "--disallow-untyped-defs",
                "--no-error-summary",
                "--cache-dir",
                str(tmp_path / ".mypy_cache"),
                str(file),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env={**os.environ, "MYPYPATH": str(STUBS)},
        )
        assert proc.returncode == 0, f"{name}:\n{proc.stdout}{proc.stderr}"


def _public_key(line: str) -> str:
    """'type base64' of an OpenSSH public key line (without the comment)."""
    return " ".join(line.split()[:2])


def test_farm_keys_are_the_test_key_files(tmp_path: Path) -> None:
    farm = (VM_TESTS / "farm.nix").read_text()
    for pub in sorted((VM_TESTS / "keys").glob("*.pub")):
        key = _public_key(pub.read_text())
        assert key in farm, f"farm.nix does not have {pub.name}"
        assert "nixfarm-vm-test-only" in pub.read_text(), f"{pub.name} is not marked as a test key"
    keygen = shutil.which("ssh-keygen")
    assert keygen is not None, "needs ssh-keygen (tests/run installs openssh-client)"
    for private in sorted(p for p in (VM_TESTS / "keys").iterdir() if p.suffix == "" and p.is_file()):
        public = private.with_name(private.name + ".pub").read_text()
        if private.name.endswith("_signing"):
            # A Nix signing key: "name:" + base64 of the ed25519 secret; its last 32 bytes: the public key.
            name, _, secret = private.read_text().strip().partition(":")
            derived = f"{name}:{base64.b64encode(base64.b64decode(secret)[32:]).decode()}"
            assert derived == public.strip(), f"{private.name} does not match its .pub"
            continue
        copy = tmp_path / private.name
        copy.write_bytes(private.read_bytes())
        copy.chmod(0o600)  # ssh-keygen refuses a private key others can read
        derived = subprocess.run(
            [keygen, "-y", "-f", str(copy)], capture_output=True, text=True, check=True, timeout=30
        ).stdout
        assert _public_key(derived) == _public_key(public), f"{private.name} does not match its .pub"
