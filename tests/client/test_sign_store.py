"""`nixfarm sign-store` and the signing key it reads: real Nix (2.8 and 2.26) on a store of the
client's own, and the inventory's trust fields."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import Client
from farm import Farm, run
from nixfarm.client.inventory import Inventory
from nixfarm.client.signing import SigningKeyError, public_key_of, read_signing_key
from nixfarm.common.errors import ConfigError

NIXFARM = str(Path(sys.executable).parent / "nixfarm")
BUILDER = {"name": "b1", "host_name": "b1.example", "systems": ["x86_64-linux"],
           "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDummy"}  # fmt: skip


def inventory_data(**top: object) -> dict[str, object]:
    client = {"name": "alice", "key_file": "/etc/nixfarm/id_ed25519"}
    if "signing_key_file" in top:
        client["signing_key_file"] = top.pop("signing_key_file")  # type: ignore[assignment]
    return {**top, "client": client, "builders": [BUILDER]}


def nix_key(tmp_path: Path, name: str = "alice-1") -> tuple[Path, str]:
    secret, public = tmp_path / name, tmp_path / f"{name}.pub"
    run(["nix-store", "--generate-binary-cache-key", name, str(secret), str(public)])
    return secret, public.read_text().strip()


# -- the inventory's trust fields ----------------------------------------------------------


def test_an_inventory_without_trust_fields_means_trusted() -> None:
    inventory = Inventory(inventory_data(), "test")
    assert inventory.trust == "trusted"
    assert inventory.signing_key_file is None


def test_trust_fields_are_read_and_checked() -> None:
    inventory = Inventory(inventory_data(trust="untrusted", signing_key_file="/var/lib/k"), "test")
    assert (inventory.trust, inventory.signing_key_file) == ("untrusted", "/var/lib/k")
    assert Inventory(inventory_data(trust="untrusted", signing_key_file=None), "t").signing_key_file is None
    with pytest.raises(ConfigError, match='"trust" must be "untrusted" or "trusted", got \'paranoid\''):
        Inventory(inventory_data(trust="paranoid"), "test")
    with pytest.raises(ConfigError, match=r"client\.signing_key_file: must be an absolute path or null"):
        Inventory(inventory_data(signing_key_file="signing-key"), "test")
    # Beside "trust" at the top level it is read too, as long as the two agree.
    top = {**inventory_data(trust="untrusted"), "signing_key_file": "/var/lib/k"}
    assert Inventory(top, "test").signing_key_file == "/var/lib/k"
    with pytest.raises(ConfigError, match="disagree"):
        Inventory({**inventory_data(signing_key_file="/other"), "signing_key_file": "/var/lib/k"}, "test")


# -- the key file ----------------------------------------------------------------------------


def test_public_key_is_the_one_nix_makes(tmp_path: Path) -> None:
    secret, public = nix_key(tmp_path)
    key = read_signing_key(str(secret))
    assert key.public_key == public
    assert key.name == "alice-1" and key.uid == 0 and key.mode == 0o600


def test_keys_that_are_not_secret_keys_are_refused(tmp_path: Path) -> None:
    secret, public = nix_key(tmp_path)
    with pytest.raises(SigningKeyError, match=r"has 32 bytes.*is this the public key"):
        public_key_of(public, "pub")
    name, data = secret.read_text().split(":")
    raw = bytearray(base64.b64decode(data))
    raw[40] ^= 1  # a flipped bit in the public half
    with pytest.raises(SigningKeyError, match="damaged"):
        public_key_of(f"{name}:{base64.b64encode(bytes(raw)).decode()}", "flipped")
    with pytest.raises(SigningKeyError, match="not valid base64"):
        public_key_of("alice-1:***", "stars")
    with pytest.raises(SigningKeyError, match="not a Nix secret key"):
        public_key_of("-----BEGIN OPENSSH PRIVATE KEY-----", "ssh")
    with pytest.raises(SigningKeyError, match=r"does not exist.*nixfarm-signing-key"):
        read_signing_key(str(tmp_path / "missing"))


# -- the command's errors -----------------------------------------------------------------


def sign_store(inventory: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [NIXFARM, "sign-store", "--inventory", str(inventory), *args],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, **kw,
    )  # fmt: skip


def test_without_a_key_in_the_inventory_it_names_the_option(tmp_path: Path) -> None:
    path = tmp_path / "inventory.json"
    path.write_text(json.dumps(inventory_data()))
    result = sign_store(path)
    assert result.returncode == 2 and result.stdout == ""
    assert 'trusted mode (services.nixfarm.farm.trust = "trusted")' in result.stderr
    assert "services.nixfarm.client.signingKeyFile" in result.stderr

    path.write_text(json.dumps(inventory_data(trust="untrusted")))
    result = sign_store(path)
    assert result.returncode == 2
    assert "client.signing_key_file is not set; the client module sets it from " in result.stderr
    assert "services.nixfarm.client.signingKeyFile" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_key_only_root_reads_needs_root(farm: Farm) -> None:
    # The farm's directory is open to all (sshd's StrictModes); the key in it is root's alone.
    secret, _ = farm.make_signing_key("alice-1")
    secret.parent.chmod(0o755)
    path = farm.root / "inventory.json"
    path.write_text(json.dumps(inventory_data(trust="untrusted", signing_key_file=str(secret))))
    path.chmod(0o644)
    result = sign_store(path, env={**os.environ, "HOME": "/"}, user="nobody", group="nogroup")
    assert result.returncode == 1, result.stderr
    assert f"cannot read the signing key {secret}: permission denied" in result.stderr
    assert "run this as root" in result.stderr


def test_nix_failing_shows_its_last_line(tmp_path: Path) -> None:
    secret, _ = nix_key(tmp_path)
    path = tmp_path / "inventory.json"
    path.write_text(json.dumps(inventory_data(trust="untrusted", signing_key_file=str(secret))))
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "nix.conf").write_text("store = nixfarm-no-such-store://\n")  # a real Nix error
    result = sign_store(path, env={**os.environ, "NIX_CONF_DIR": str(conf)})
    assert result.returncode == 1
    assert "nix store sign --all failed: error: don't know how to open Nix store" in result.stderr
    assert "nixfarm-no-such-store://" in result.stderr


# -- with real Nix, on a store of the client's own ------------------------------------------------


def unsigned(client: Client) -> int:
    """Unsigned paths of `client`'s store, counted as doctor counts them (inside its namespace)."""
    code = (
        "import sys; sys.path.insert(0, '/opt/nixfarm'); from nixfarm.client.signing import count_unsigned; "
        "print(count_unsigned())"
    )
    python = "python3" if client.nix == "2.26" else sys.executable
    result = client.run([python, "-c", code])
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def build_locally(farm: Farm, client: Client) -> str:
    """A derivation with an input, both built by the client itself; the output's path."""
    nonce = secrets.token_hex(4)
    expr = farm.root / f"local-{nonce}.nix"
    expr.write_text(
        textwrap.dedent(f"""\
        let dep = derivation {{ name = "dep-{nonce}"; system = builtins.currentSystem;
                               builder = "/bin/sh"; args = [ "-c" "echo dep > $out" ]; }};
        in derivation {{ name = "top-{nonce}"; system = builtins.currentSystem; builder = "/bin/sh";
                        args = [ "-c" "/bin/cat ${{dep}} > $out" ]; }}
        """)
    )
    result = client.run(["nix-build", str(expr), "--no-out-link"])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("nix", ["2.8", "2.26"])
def test_sign_store_signs_what_the_store_held(farm: Farm, nix: str) -> None:
    client = Client(farm.root, nix=nix, own_store=True)
    secret, public = farm.make_signing_key("alice-1")
    inventory = farm.root / "inventory.json"
    inventory.write_text(json.dumps(inventory_data(trust="untrusted", signing_key_file=str(secret))))
    build_locally(farm, client)  # no secret-key-files yet: built unsigned
    before = unsigned(client)
    assert before >= 2  # the two outputs (the .drv files are content-addressed)

    first = client.run([client.nixfarm, "sign-store", "--inventory", str(inventory)])
    assert first.returncode == 0, first.stderr
    count = int(first.stdout.split()[0])
    assert count >= before  # the unsigned ones, and the .drv files, which had no signature either
    assert first.stdout == f"{count} paths got a signature by alice-1 ({public})\n"
    assert unsigned(client) == 0

    again = client.run([client.nixfarm, "sign-store", "--inventory", str(inventory), "--json"])
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"key": public, "key_file": str(secret), "signatures_added": 0}

    # From now on Nix signs what it builds: nothing new is unsigned.
    signed = Client(farm.root, nix=nix, own_store=True, signing_key=secret)
    build_locally(farm, signed)
    assert unsigned(signed) == 0
