"""The client's Nix signing key, and signing what its store already holds.

In the farm's untrusted mode (inventory "trust": "untrusted") the builders do
not trust their clients: they accept an input-addressed path from a client
only if it is signed by a key in their `trusted-public-keys` ("cannot add path
'...' because it lacks a signature by a trusted key", Nix >= 2.16). The client
module gives each client a signing key and sets `secret-key-files`, so its Nix
signs what it builds from then on; `nixfarm sign-store` signs what the store
held before (and what arrived unsigned, e.g. outputs copied back from a
builder that has no key of its own).

A Nix secret key file is one line "name:base64(64 bytes)", the 64 bytes an
ed25519 secret key as libsodium keeps it: the 32-byte seed, then the 32-byte
public key. Its public key is "name:base64(those last 32 bytes)", what
`nix key convert-secret-to-public` prints (Nix >= 2.10; 2.8 has no such
command, so we read the file ourselves).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass

from ..common.errors import ConfigError, EnvironmentProblem, NixfarmError
from ..common.store import count_unsigned  # noqa: F401 - doctor and sign-store read it here
from .inventory import Inventory, load_inventory

MAX_KEY_FILE = 4096  # a key line is ~100 bytes
SIGN_TIMEOUT = 3600  # a big store: one signature per path, each a database write
KEY_OPTION = "services.nixfarm.client.signingKeyFile"
TRUST_OPTION = "services.nixfarm.farm.trust"
_ADDED = re.compile(r"added (\d+) signatures?")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class SigningKeyError(NixfarmError):
    """The signing key is missing, unreadable or not a Nix secret key."""


@dataclass
class SigningKey:
    """A Nix secret key file, checked: its name, public key and file mode."""

    path: str
    name: str
    public_key: str  # "name:base64", as trusted-public-keys lists it
    uid: int
    mode: int


def public_key_of(text: str, where: str) -> tuple[str, str]:
    """(name, "name:base64(public)") of a Nix secret key's text; SigningKeyError if it is not one.

    Checks that the public half is the one the seed makes, so a truncated or
    edited file is caught here rather than as signatures no builder accepts.
    """
    name, colon, data = text.strip().partition(":")
    if not colon or not name or any(c.isspace() for c in name):
        raise SigningKeyError(f"{where} is not a Nix secret key ('name:base64', from nix-store "
                              "--generate-binary-cache-key)")  # fmt: skip
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SigningKeyError(f"{where}: the key {name!r} is not valid base64") from None
    if len(raw) != 64:
        raise SigningKeyError(
            f"{where}: the key {name!r} has {len(raw)} bytes, not the 64 of an ed25519 secret key"
            + (" (is this the public key?)" if len(raw) == 32 else "")
        )
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    derived = (
        Ed25519PrivateKey.from_private_bytes(raw[:32])
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    if derived != raw[32:]:
        raise SigningKeyError(f"{where}: the key {name!r} is damaged (its public half does not match)")
    return name, f"{name}:{base64.b64encode(raw[32:]).decode()}"


def read_signing_key(path: str) -> SigningKey:
    """Read and check the secret key file at `path`; SigningKeyError says what is wrong and how to fix it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except PermissionError:
        raise SigningKeyError(f"cannot read the signing key {path}: permission denied (it is root's: "
                              "run this as root)") from None  # fmt: skip
    except FileNotFoundError:
        raise SigningKeyError(f"the signing key {path} does not exist (the client module makes it at "
                              "boot: systemctl start nixfarm-signing-key)") from None  # fmt: skip
    except OSError as e:
        problem = (e.strerror or str(e)).lower()
        raise SigningKeyError(f"cannot read the signing key {path}: {problem}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SigningKeyError(f"the signing key {path} is not a regular file")
        data = f.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise SigningKeyError(f"{path} is larger than a Nix secret key ({MAX_KEY_FILE} bytes at most)")
    name, public = public_key_of(data.decode("utf-8", errors="replace"), path)
    return SigningKey(path, name, public, st.st_uid, stat.S_IMODE(st.st_mode))


def key_file_of(inventory: Inventory, source: str) -> str:
    """The inventory's signing key file, or a UsageError that says which option sets it."""
    if inventory.signing_key_file:
        return inventory.signing_key_file
    if inventory.trust == "trusted":
        raise ConfigError(
            f'{source}: the farm is in trusted mode ({TRUST_OPTION} = "trusted"), so this client has no '
            f"signing key (client.signing_key_file is null) and builders accept its paths unsigned; in "
            f"untrusted mode the client module sets it from {KEY_OPTION}"
        )
    raise ConfigError(
        f"{source}: client.signing_key_file is not set; the client module sets it from {KEY_OPTION} "
        f'where {TRUST_OPTION} = "untrusted"'
    )


def sign_store(key_file: str) -> int | None:
    """Sign every valid path of the local store with `key_file` (through Nix); how many
    signatures it added (paths already signed with this key get none), None if Nix did not say."""
    argv = ["nix", "--extra-experimental-features", "nix-command", "store", "sign", "--all",
            "--key-file", key_file]  # fmt: skip
    try:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=SIGN_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise EnvironmentProblem("nix is not on PATH: sign-store runs Nix's own `nix store sign`") from None
    except subprocess.TimeoutExpired:
        raise NixfarmError(f"nix store sign did not finish in {SIGN_TIMEOUT} s") from None
    if result.returncode != 0:
        raise NixfarmError(f"nix store sign --all failed: {_last_line(result.stderr)}")
    added = _ADDED.search(result.stderr)  # Nix says it at info level, on stderr
    return int(added.group(1)) if added else None


def _last_line(text: str) -> str:
    lines = [line for line in _ANSI.sub("", text).strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "(no output)"


def run_sign_store(inventory_path: str, as_json: bool) -> int:
    """Entry point of `nixfarm sign-store`: sign the local store with this client's key."""
    inventory = load_inventory(inventory_path)
    key = read_signing_key(key_file_of(inventory, inventory_path))
    added = sign_store(key.path)
    if as_json:
        print(json.dumps({"key": key.public_key, "key_file": key.path, "signatures_added": added}))
    elif added is None:
        print(f"signed the store with {key.name} (Nix did not say how many paths were new)")
    else:
        print(f"{added} paths got a signature by {key.name} ({key.public_key})")
    if key.mode & 0o077 or key.uid != 0:
        print(
            f"nixfarm sign-store: warning: {key.path} is not root's alone "
            f"(uid {key.uid}, mode {key.mode:04o}): whoever reads it can sign paths every untrusted "
            f"builder accepts; chown root {key.path} && chmod 600 {key.path}",
            file=sys.stderr,
        )
    return 0
