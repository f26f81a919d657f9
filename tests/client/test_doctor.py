"""`nixfarm doctor` against real harness builders: real sshd, gateway and nix-daemon.

Plus unit tests of the checks that the harness cannot provoke (a builder's
clock cannot differ from ours: the builders are namespaces of this kernel).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import HERE, Client
from farm import Builder, Farm, run
from nixfarm.client.doctor import (
    CHECKS,
    FAIL,
    OK,
    SKIP,
    WARN,
    BuilderDoctor,
    KeyFile,
    Timeouts,
    _clean,
    check_key_file,
    check_signing,
    nix_version_tuple,
)
from nixfarm.client.inventory import Inventory


def doctor(farm: Farm, inventory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `nixfarm doctor` as a user would; never more than a minute."""
    return subprocess.run(
        [farm.nixfarm, "doctor", "--inventory", str(inventory), *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def doctor_json(farm: Farm, inventory: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """(exit code, {builder: {"usable": ..., check name: {"status", "message", "fix"}}})."""
    result = doctor(farm, inventory, "--json")
    assert "Traceback" not in result.stderr, result.stderr
    builders = {}
    for b in json.loads(result.stdout):
        checks: dict[str, Any] = {c["check"]: c for c in b["checks"]}
        builders[b["name"]] = {"usable": b["usable"], **checks}
    return result.returncode, builders


def edit_inventory(path: Path, index: int = 0, **changes: object) -> None:
    """Change fields of builder `index` in the inventory file."""
    data = json.loads(path.read_text())
    data["builders"][index].update(changes)
    path.write_text(json.dumps(data))


def after(check: str) -> tuple[str, ...]:
    """The checks that come after `check` (skipped when it stops a builder's checks)."""
    return CHECKS[CHECKS.index(check) + 1 :]


# A healthy builder of a farm in trusted mode: the trust check warns, the signing checks are not needed.
TRUSTED_FARM = {**dict.fromkeys(CHECKS, OK), "trust": WARN, "signing-key": SKIP, "unsigned-paths": SKIP}


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {name: report[name]["status"] for name in CHECKS}


# What each builder Nix's daemon says in the handshake, and how doctor learns trust from it:
# Nix 2.8 speaks protocol 1.34, before the 1.35 trust flag, so doctor probes with a
# restricted setting. Nix 2.26 offers 1.38 (which adds a feature exchange doctor does
# not need), so the two speak doctor's 1.37, whose handshake carries the trust flag.
DAEMONS = {
    "2.8": ("daemon protocol 1.34 (Nix 2.8.0)", "no trust flag; from the daemon's answer to a restricted"),
    "2.26": ("daemon protocol 1.38 (Nix 2.26.3), spoken at 1.37", "(daemon protocol 1.37 handshake flag)"),
}


@pytest.mark.parametrize("nix", DAEMONS)
def test_healthy_builder_passes_every_check(farm: Farm, nix: str) -> None:
    farm.add_client("alice")
    b = farm.add_builder("b1", clients={"alice": "build"}, nix=nix)
    inventory = farm.write_inventory("alice", [b])

    code, reports = doctor_json(farm, inventory)
    assert code == 0
    report = reports["b1"]
    assert report["usable"] is True
    # An inventory without "trust" is a trusted farm: usable, with a word on what that risks.
    assert statuses(report) == TRUSTED_FARM
    assert "as good as root on b1" in report["trust"]["message"]
    assert report["trust"]["fix"].startswith('services.nixfarm.farm.trust = "untrusted"')
    if nix == "2.8":  # too old for the untrusted mode: the fix says so
        assert report["trust"]["fix"].endswith(
            "(needs Nix 2.16 or later; b1 runs Nix 2.8.0: upgrade it first)"
        )
    else:
        assert report["trust"]["fix"].endswith("(Nix 2.16 or later on builders and clients)")
    assert report["signing-key"]["message"].startswith("not needed: the farm is in trusted mode")
    # A real ssh-ng handshake with this Nix's daemon, and its way of telling trust.
    daemon, trust_how = DAEMONS[nix]
    assert report["daemon"]["message"] == f"ssh-ng handshake: {daemon}", report["daemon"]
    assert "trusts nixfarm" in report["trust"]["message"]
    assert trust_how in report["trust"]["message"], report["trust"]
    assert report["metrics"]["message"].startswith("schema 1 snapshot from b1")

    text = doctor(farm, inventory)
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[0].startswith("b1 (ssh-ng://nixfarm@") and lines[0].endswith("usable")
    labels = {OK: "ok", WARN: "warn", SKIP: "skip"}
    assert [line.split()[:2] for line in lines[1:-1]] == [[labels[TRUSTED_FARM[n]], n] for n in CHECKS]
    assert lines[-1] == "all 1 builders usable"

    # ssh:// builders: the legacy `nix-store --serve --write` handshake is checked as well.
    edit_inventory(inventory, protocol="ssh")
    code, reports = doctor_json(farm, inventory)
    assert code == 0
    assert "nix-store --serve --write answers too" in reports["b1"]["daemon"]["message"]


def test_unresolvable_host_name(farm: Farm) -> None:
    farm.add_client("alice")
    b = farm.add_builder("b1", clients={"alice": "build"})
    inventory = farm.write_inventory("alice", [b])

    # The machines file names the builder by host_name: Nix's ssh cannot reach it, though the
    # inventory's address still lets doctor check the rest.
    edit_inventory(inventory, host_name="no-such-builder.invalid")
    code, reports = doctor_json(farm, inventory)
    assert code == 1
    report = reports["b1"]
    assert report["usable"] is False
    assert report["resolve"]["status"] == FAIL
    assert "'no-such-builder.invalid'" in report["resolve"]["message"]
    assert "/etc/hosts" in report["resolve"]["fix"]
    assert report["tcp"]["status"] == OK and report["daemon"]["status"] == OK

    # Without a usable address nothing else can run.
    edit_inventory(inventory, host_name="no-such-builder.invalid", address="no-such-builder.invalid")
    code, reports = doctor_json(farm, inventory)
    assert code == 1
    assert reports["b1"]["resolve"]["status"] == FAIL
    assert {reports["b1"][name]["status"] for name in after("resolve")} == {SKIP}
    assert reports["b1"]["tcp"]["message"] == "not checked: resolve failed"


def test_sshd_down_is_refused_and_other_builders_stay_usable(farm: Farm) -> None:
    farm.add_client("alice")
    good = farm.add_builder("good", clients={"alice": "build"})
    down = farm.add_builder("down", clients={"alice": "build"})
    inventory = farm.write_inventory("alice", [good, down])
    down.kill_sshd()
    deadline = time.monotonic() + 10
    while any("sshd" in cmd for _, cmd in down.processes()) and time.monotonic() < deadline:
        time.sleep(0.05)

    code, reports = doctor_json(farm, inventory)
    assert code == 1
    assert reports["good"]["usable"] is True
    assert reports["down"]["usable"] is False
    assert reports["down"]["tcp"]["status"] == FAIL
    assert "connection refused" in reports["down"]["tcp"]["message"]
    assert "start sshd" in reports["down"]["tcp"]["fix"]
    assert {reports["down"][name]["status"] for name in after("tcp")} == {SKIP}

    text = doctor(farm, inventory)
    assert text.returncode == 1
    assert "1 of 2 builders unusable: down" in text.stdout
    fail_lines = [line for line in text.stdout.splitlines() if line.lstrip().startswith("FAIL")]
    assert len(fail_lines) == 1 and "tcp" in fail_lines[0] and "-- fix: start sshd" in fail_lines[0]


def test_link_down_is_bounded(farm: Farm) -> None:
    farm.add_client("alice")
    b = farm.add_builder("b1", clients={"alice": "build"})
    inventory = farm.write_inventory("alice", [b])
    b.set_link(False)
    start = time.monotonic()
    code, reports = doctor_json(farm, inventory)
    assert time.monotonic() - start < 30
    assert code == 1
    # Depending on the route, the connection times out, or a middlebox accepts it and never
    # sends an SSH banner (this sandbox's default route does): either way, bounded and explained.
    assert reports["b1"]["tcp"]["status"] == FAIL
    assert "firewall" in reports["b1"]["tcp"]["fix"]
    assert {reports["b1"][name]["status"] for name in after("tcp")} == {SKIP}


def test_wrong_host_key_shows_the_real_one(farm: Farm) -> None:
    farm.add_client("alice")
    b = farm.add_builder("b1", clients={"alice": "build"})
    inventory = farm.write_inventory("alice", [b])
    other = farm.root / "other_host_key"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)])
    edit_inventory(inventory, host_key=" ".join(other.with_suffix(".pub").read_text().split()[:2]))

    code, reports = doctor_json(farm, inventory)
    assert code == 1
    check = reports["b1"]["host-key"]
    assert check["status"] == FAIL
    assert "HOST KEY MISMATCH" in check["message"]
    real_fingerprint = run(["ssh-keygen", "-lf", str(b.root / "ssh_host_ed25519_key.pub")]).stdout.split()[1]
    wrong_fingerprint = run(["ssh-keygen", "-lf", str(other.with_suffix(".pub"))]).stdout.split()[1]
    assert real_fingerprint in check["message"] and wrong_fingerprint in check["message"]
    assert f'hostKey = "{b.host_key}"' in check["fix"]
    assert {reports["b1"][name]["status"] for name in after("host-key")} == {SKIP}


def test_key_file_readable_by_others(farm: Farm) -> None:
    key = farm.add_client("alice")
    b = farm.add_builder("b1", clients={"alice": "build"})
    inventory = farm.write_inventory("alice", [b])
    os.chmod(key, 0o644)

    code, reports = doctor_json(farm, inventory)
    assert code == 1
    check = reports["b1"]["key-file"]
    assert check["status"] == FAIL
    assert "mode 0644" in check["message"]
    assert check["fix"] == f"chmod 600 {key}"
    # OpenSSH would ignore the key; asyncssh does not, so the rest is still checked.
    assert reports["b1"]["login"]["status"] == OK and reports["b1"]["trust"]["status"] == WARN  # reached

    os.chmod(key, 0o600)
    code, _ = doctor_json(farm, inventory)
    assert code == 0


def test_key_not_authorized_on_the_builder(farm: Farm) -> None:
    farm.add_client("alice")
    farm.add_client("mallory")
    b = farm.add_builder("b1", clients={"alice": "build"})
    inventory = farm.write_inventory("mallory", [b])

    code, reports = doctor_json(farm, inventory)
    assert code == 1
    assert reports["b1"]["login"]["status"] == FAIL
    public = " ".join(farm.client_keys["mallory"].with_suffix(".pub").read_text().split()[:2])
    assert f'clients.mallory.publicKey = "{public}"' in reports["b1"]["login"]["fix"]


def test_metrics_role_key_cannot_build(farm: Farm) -> None:
    farm.add_client("alice")
    b = farm.add_builder("b1", clients={"alice": "metrics"})
    inventory = farm.write_inventory("alice", [b])

    code, reports = doctor_json(farm, inventory)
    assert code == 1
    report = reports["b1"]
    assert report["metrics"]["status"] == OK  # the metrics role may read metrics
    assert report["build-role"]["status"] == FAIL
    assert "this key has the metrics role" in report["build-role"]["message"]
    assert "builds are refused" in report["build-role"]["message"]
    assert 'clients.alice.role = "build"' in report["build-role"]["fix"]
    assert report["daemon"]["status"] == SKIP
    assert report["daemon"]["message"] == "not checked: build-role failed"


@pytest.mark.parametrize("nix", DAEMONS)
def test_untrusted_builder_user(farm: Farm, nix: str) -> None:
    farm.add_client("alice")
    # A later trusted-users line wins: nixfarm is no longer trusted by the builder's daemon.
    b = farm.add_builder("b1", clients={"alice": "build"}, nix_conf="trusted-users = root\n", nix=nix)
    inventory = farm.write_inventory("alice", [b])

    code, reports = doctor_json(farm, inventory)
    assert code == 1
    check = reports["b1"]["trust"]
    assert check["status"] == FAIL
    assert "does not trust nixfarm" in check["message"]
    assert DAEMONS[nix][1] in check["message"], check
    assert "trusted-users" in check["fix"]
    assert reports["b1"]["daemon"]["status"] == OK


def test_feature_the_builder_lacks(farm: Farm) -> None:
    farm.add_client("alice")
    b = farm.add_builder("b1", clients={"alice": "build"})
    inventory = farm.write_inventory("alice", [b])
    edit_inventory(inventory, features=["big-parallel", "kvm"], mandatory_features=["cuda"])

    code, reports = doctor_json(farm, inventory)
    assert code == 1
    check = reports["b1"]["features"]
    assert check["status"] == FAIL
    assert "claims kvm, cuda but the builder does not offer them" in check["message"]
    assert "big-parallel" not in check["message"].split("(it offers")[0]  # it does offer that one
    assert reports["b1"]["systems"]["status"] == OK

    edit_inventory(inventory, features=["big-parallel"], mandatory_features=[], systems=["riscv64-linux"])
    code, reports = doctor_json(farm, inventory)
    assert code == 1
    assert reports["b1"]["features"]["status"] == OK
    assert reports["b1"]["systems"]["status"] == FAIL
    assert "riscv64-linux builds" in reports["b1"]["systems"]["message"]


def test_hostile_builders_do_not_crash_doctor(farm: Farm) -> None:
    key = farm.add_client("alice")
    pub = key.with_suffix(".pub").read_text().strip()
    builders: list[Builder] = []
    for mode in ("garbage", "huge"):  # every command answers random bytes, or 10 MiB without a newline
        b = farm.add_builder(mode, clients={"alice": "build"})
        line = f'restrict,command="{sys.executable} {HERE / "hostile_agent.py"} {mode}" {pub}\n'
        (b.root / "authorized_keys" / "nixfarm").write_text(line)
        builders.append(b)
    inventory = farm.write_inventory("alice", builders)

    start = time.monotonic()
    code, reports = doctor_json(farm, inventory)
    assert time.monotonic() - start < 45
    assert code == 1
    garbage, huge = reports["garbage"], reports["huge"]
    assert garbage["metrics"]["status"] == WARN and "not a usable snapshot" in garbage["metrics"]["message"]
    assert huge["metrics"]["status"] == WARN and "longer than 1048576 bytes" in huge["metrics"]["message"]
    for report in (garbage, huge):
        assert report["daemon"]["status"] == FAIL
        assert "not a Nix daemon" in report["daemon"]["message"]
        assert report["clock"]["status"] == SKIP


# -- unit tests: no harness ------------------------------------------------------------------


BUILDER = {"name": "b1", "host_name": "b1.example", "systems": ["x86_64-linux"],
           "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDummy"}  # fmt: skip


def _builder_doctor(**builder: object) -> BuilderDoctor:
    data = {
        "client": {"name": "alice", "key_file": "/nonexistent"},
        "builders": [
            {
                "name": "b1",
                "host_name": "b1.example",
                "systems": ["x86_64-linux"],
                "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDummy",
                **builder,
            }
        ],
    }
    inventory = Inventory(data, "test")
    key = KeyFile(check_key_file("/nonexistent").check, False, "")
    return BuilderDoctor(inventory, inventory.builders[0], key, Timeouts())


@pytest.mark.parametrize(
    ("offset", "status"),
    [(0.5, OK), (-3.0, OK), (30.0, WARN), (-30.0, WARN), (90.0, FAIL), (-3600.0, FAIL)],
)
def test_clock_skew_thresholds(offset: float, status: str) -> None:
    d = _builder_doctor()
    now = time.time()
    d.clock({"timestamp": now + offset}, now - 0.1, now + 0.1)
    (check,) = d.checks
    assert check.status == status, check
    assert ("ahead of" if offset > 0 else "behind") in check.message
    if status != OK:
        assert "TLS" in check.message and "NTP" in check.fix


def test_clock_needs_a_numeric_timestamp() -> None:
    d = _builder_doctor()
    d.clock({"timestamp": "yesterday"}, 0.0, 1.0)
    d.clock(None, 0.0, 1.0)
    assert [c.status for c in d.checks] == [SKIP, SKIP]


def test_systems_and_features_from_hostile_snapshots() -> None:
    d = _builder_doctor(features=["kvm"])
    d.systems_and_features({"systems": "x86_64-linux", "features": [1, None, "kvm\x1b[2J"]})
    systems, features = d.checks
    assert systems.status == FAIL and "builds for nothing" in systems.message
    assert features.status == FAIL and "\x1b" not in features.message


SHARING = {"hostname": "b1", "port": "22", "controlmaster": "auto", "controlpersist": "60"}


def test_ssh_sharing_off_or_with_a_private_socket_directory(tmp_path: Path) -> None:
    d = _builder_doctor()
    d.ssh_sharing({"hostname": "b1", "port": "22", "controlmaster": "false", "controlpath": "none"})
    sockets = tmp_path / "nixfarm-ssh"
    sockets.mkdir(mode=0o700)
    d.ssh_sharing({**SHARING, "controlpath": f"{sockets}/0123abcd"})
    off, shared = d.checks
    assert off.status == OK and "own SSH connection" in off.message
    assert shared.status == OK and str(sockets) in shared.message and "60 s" in shared.message


def test_ssh_sharing_without_its_socket_directory_fails_every_build(tmp_path: Path) -> None:
    d = _builder_doctor()
    missing = tmp_path / "gone"
    d.ssh_sharing({**SHARING, "controlpath": f"{missing}/0123abcd"})
    (tmp_path / "file").write_text("")
    d.ssh_sharing({**SHARING, "controlpath": f"{tmp_path / 'file'}/0123abcd"})
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    d.ssh_sharing({**SHARING, "controlpath": f"{open_to_all}/0123abcd"})
    gone, not_a_dir, writable = d.checks
    assert gone.status == FAIL and "no such file or directory" in gone.message
    assert "every build here fails" in gone.message and "systemd-tmpfiles --create" in gone.fix
    assert not_a_dir.status == FAIL and "not a directory" in not_a_dir.message
    assert writable.status == FAIL and "others may write" in writable.message and "0777" in writable.message
    assert f"chmod 0700 {open_to_all}" in writable.fix


def test_key_file_checks(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
    good = check_key_file(str(key))
    assert good.usable and good.check.status == OK and "mode 0600" in good.check.message
    assert good.public_key == " ".join(key.with_suffix(".pub").read_text().split()[:2])

    os.chmod(key, 0o640)
    loose = check_key_file(str(key))
    assert loose.usable and loose.check.status == FAIL and loose.check.fix == f"chmod 600 {key}"

    locked = tmp_path / "id_locked"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(locked)])
    result = check_key_file(str(locked))
    assert not result.usable and "passphrase" in result.check.message
    assert result.check.fix == f"remove the passphrase: ssh-keygen -p -N '' -f {locked}"

    garbage = tmp_path / "garbage"
    garbage.write_bytes(os.urandom(300))
    os.chmod(garbage, 0o600)
    assert check_key_file(str(garbage)).check.status == FAIL

    missing = check_key_file(str(tmp_path / "missing"))
    assert not missing.usable and "No such file" in missing.check.message
    assert "ssh-keygen -t ed25519" in missing.check.fix


def test_builder_text_is_made_safe_to_print() -> None:
    # Nix colours its errors; a hostile builder may send terminal escapes or endless text.
    assert _clean("invalid operation \x1b[35;1m0\x1b[0m") == "invalid operation 0"
    assert _clean("a\x07b\x1b]0;title\x07") == "a?b?]0;title?"
    assert len(_clean("x" * 10_000)) == 300


# -- the farm's untrusted mode ------------------------------------------------------------------


def client_doctor_json(client: Client, inventory: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """doctor_json, run as `client` (its Nix, its own store: the unsigned count is of that store)."""
    result = client.run([client.nixfarm, "doctor", "--inventory", str(inventory), "--json"], timeout=90)
    assert "Traceback" not in result.stderr, result.stderr
    builders = {}
    for b in json.loads(result.stdout):
        builders[b["name"]] = {"usable": b["usable"], **{c["check"]: c for c in b["checks"]}}
    return result.returncode, builders


def test_untrusted_mode(farm: Farm) -> None:
    """One farm in untrusted mode: a builder as it should be, one that still trusts its clients,
    one whose Nix is too old to build for untrusted users; the client's key and store."""
    farm.add_client("alice")
    secret, public = farm.make_signing_key("alice-1")
    good = farm.add_builder("good", clients={"alice": "build"}, nix="2.26", trusted=False,
                            trusted_public_keys=[public])  # fmt: skip
    still = farm.add_builder("still", clients={"alice": "build"}, nix="2.26")
    old = farm.add_builder("old", clients={"alice": "build"}, trusted=False, trusted_public_keys=[public])
    client = Client(farm.root, nix="2.26")
    inventory = farm.write_inventory("alice", [good, still, old], trust="untrusted", signing_key_file=secret)
    unsigned = farm.root / "unsigned.nix"
    unsigned.write_text('derivation { name = "unsigned"; system = builtins.currentSystem; '
                        'builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; }')  # fmt: skip
    assert client.run(["nix-build", str(unsigned), "--no-out-link"]).returncode == 0  # before the key

    code, reports = client_doctor_json(client, inventory)
    assert code == 1  # old is unusable
    assert reports["good"]["usable"] and reports["still"]["usable"] and not reports["old"]["usable"]
    trust = {name: reports[name]["trust"] for name in reports}
    assert trust["good"]["status"] == OK
    assert "does not trust nixfarm (daemon protocol 1.37 handshake flag)" in trust["good"]["message"]
    assert "cannot take root there" in trust["good"]["message"]
    assert trust["still"]["status"] == WARN
    assert (
        "still trusts nixfarm" in trust["still"]["message"]
        and "as good as root on still" in trust["still"]["message"]
    )
    assert trust["still"]["fix"].startswith(
        "rebuild still with the farm's settings: services.nixfarm.farm.trust"
    )
    assert trust["old"]["status"] == FAIL
    assert "runs Nix 2.8.0" in trust["old"]["message"]
    assert "you are not privileged to build input-addressed derivations" in trust["old"]["message"]
    assert "upgrade Nix on old to 2.16 or later" in trust["old"]["fix"]
    for report in reports.values():  # the client's own checks are the same for every builder
        assert report["signing-key"]["status"] == OK
        assert report["signing-key"]["message"].startswith(f"{secret}: {public}, root's, mode 0600")
        assert "services.nixfarm.farm.clients.alice.signingKey" in report["signing-key"]["message"]
        check = report["unsigned-paths"]
        assert check["status"] == WARN and check["fix"] == "nixfarm sign-store"
        count = int(check["message"].split()[0])
        assert count >= 1  # the output built above (its .drv is content-addressed)
        assert check["message"] == (
            f"{count} paths are unsigned: a build that needs one of them as an input will fail on "
            "untrusted builders ('lacks a signature by a trusted key')"
        )

    assert client.run([client.nixfarm, "sign-store", "--inventory", str(inventory)]).returncode == 0
    secret.chmod(0o644)
    edit_inventory(inventory, index=0, protocol="ssh")
    code, reports = client_doctor_json(client, inventory)
    assert reports["good"]["unsigned-paths"]["status"] == OK
    assert reports["good"]["signing-key"]["status"] == FAIL
    assert "not root's alone (uid 0, mode 0644)" in reports["good"]["signing-key"]["message"]
    assert reports["good"]["signing-key"]["fix"] == f"chown root {secret} && chmod 600 {secret}"
    assert reports["good"]["trust"]["status"] == FAIL  # ssh:// builds need a trusted user
    assert "ssh:// (nix-store --serve)" in reports["good"]["trust"]["message"]
    assert (
        reports["good"]["trust"]["fix"]
        == 'use ssh-ng: services.nixfarm.farm.builders.good.protocol = "ssh-ng"'
    )

    data = json.loads(inventory.read_text())
    data["client"]["signing_key_file"] = None
    inventory.write_text(json.dumps(data))
    code, reports = client_doctor_json(client, inventory)
    check = reports["still"]["signing-key"]
    assert check["status"] == WARN and "this client has no signing key" in check["message"]
    assert "services.nixfarm.client.signingKeyFile" in check["fix"]


def test_signing_checks_unit(tmp_path: Path) -> None:
    trusted = Inventory({"client": {"name": "a", "key_file": "/k"}, "builders": [BUILDER]}, "t")
    assert [(c.name, c.status) for c in check_signing(trusted)] == [
        ("signing-key", SKIP),
        ("unsigned-paths", SKIP),
    ]
    db = tmp_path / "db.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE ValidPaths (id INTEGER PRIMARY KEY, path TEXT, sigs TEXT, ca TEXT)")
        conn.executemany(
            "INSERT INTO ValidPaths (path, sigs, ca) VALUES (?, ?, ?)",
            [("/nix/store/a", None, None), ("/nix/store/b", "", ""), ("/nix/store/c", "k:sig", None),
             ("/nix/store/d.drv", None, "text:sha256:x"), ("/nix/store/e", None, None)],
        )  # fmt: skip
    client = {"name": "a", "key_file": "/k", "signing_key_file": str(tmp_path / "no")}
    untrusted = Inventory({"trust": "untrusted", "client": client, "builders": [BUILDER]}, "t")
    key, paths = check_signing(untrusted, str(db))
    assert key.status == FAIL and "does not exist" in key.message and "nixfarm-signing-key" in key.fix
    assert paths.status == WARN and paths.message.startswith("3 paths are unsigned")
    _, missing = check_signing(untrusted, str(tmp_path / "none.sqlite"))
    assert missing.status == WARN and "could not count them" in missing.message
    assert nix_version_tuple("2.26.3") == (2, 26) and nix_version_tuple(None) is None
