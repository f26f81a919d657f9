"""The client's farm inventory: which builders it uses and how it reaches them.

The NixOS client module writes it (/etc/nixfarm/inventory.json):

    {"trust": "untrusted",
     "client": {"name": "alice", "key_file": "/etc/nixfarm/id_ed25519",
                "signing_key_file": "/var/lib/nixfarm-client/signing-key"},
     "builders": [{"name": "big", "host_name": "big.example", "address": "10.0.0.2",
                   "port": 22, "protocol": "ssh-ng", "ssh_user": "nixfarm",
                   "systems": ["x86_64-linux"], "features": ["big-parallel"],
                   "mandatory_features": [], "host_key": "ssh-ed25519 AAAA...",
                   "max_jobs": 4, "speed_factor": 1, "static_line": "..."}]}

Validated on load; every error names the key (builders[2].host_key) and says
what it must be.

`trust` is the farm's mode (services.nixfarm.farm.trust): "untrusted", where
builders do not trust their clients and accept only inputs signed by a key
they trust, or "trusted". Inventories written before the mode existed have
none and mean "trusted" (the builder user was a trusted Nix user then).
`client.signing_key_file` is the secret key this client's Nix signs with
(`secret-key-files`), or null where the farm is trusted; a top-level
`signing_key_file` beside "trust" is read as the same field.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from ..common.errors import ConfigError
from ..common.names import NAME

MAX_INVENTORY_BYTES = 4 << 20
_HOST_KEY = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+=*")
PROTOCOLS = ("ssh-ng", "ssh")
TRUST_MODES = ("untrusted", "trusted")


class Builder:
    """One builder as this client reaches it."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.name: str = _get(data, "name", str, where)
        if not NAME.fullmatch(self.name):
            raise ConfigError(f"{where}.name: {self.name!r} must be letters, digits, '.', '_', '-'")
        self.host_name: str = _get(data, "host_name", str, where)
        self.address: str = _get(data, "address", str, where, default=self.host_name) or self.host_name
        self.port: int = _get(data, "port", int, where, default=22)
        if not 0 < self.port < 65536:
            raise ConfigError(f"{where}.port: {self.port} is not a TCP port")
        self.protocol: str = _get(data, "protocol", str, where, default="ssh-ng")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"{where}.protocol: {self.protocol!r} must be one of {', '.join(PROTOCOLS)}")
        self.ssh_user: str = _get(data, "ssh_user", str, where, default="nixfarm")
        self.systems: list[str] = _strings(data, "systems", where)
        if not self.systems:
            raise ConfigError(f"{where}.systems: list at least one system, e.g. x86_64-linux")
        self.features: list[str] = _strings(data, "features", where, default=[])
        self.mandatory_features: list[str] = _strings(data, "mandatory_features", where, default=[])
        self.host_key: str = _get(data, "host_key", str, where)
        if not _HOST_KEY.fullmatch(self.host_key):
            raise ConfigError(f"{where}.host_key: must be a public key like 'ssh-ed25519 AAAA...'")
        self.max_jobs: int = _get(data, "max_jobs", int, where, default=1)
        self.speed_factor: int = _get(data, "speed_factor", int, where, default=1)
        if self.max_jobs < 0 or self.speed_factor < 1:
            raise ConfigError(f"{where}: max_jobs must be >= 0 and speed_factor >= 1")

        # Worked out once: the dispatcher writes these lines for hundreds of builders, often.
        self.store_uri = f"{self.protocol}://{self.ssh_user}@{self.host_name}"  # Nix's name for it
        supported = sorted(set(self.features) | set(self.mandatory_features))
        host_key = base64.b64encode(self.host_key.encode()).decode()  # as the machines file has it
        self._line_head = f"{self.store_uri} {_field(self.systems)}"
        self._line_tail = f"{_field(supported)} {_field(self.mandatory_features)} {host_key}"

    def machines_line(self, key_file: str, max_jobs: int, speed_factor: int) -> str:
        """A line of Nix's machines file for this builder."""
        return f"{self._line_head} {key_file} {max_jobs} {speed_factor} {self._line_tail}"


def _field(values: list[str]) -> str:
    """A list field of the machines file."""
    return ",".join(values) or "-"


class Inventory:
    """This client's name and key, and its builders."""

    def __init__(self, data: Any, source: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a JSON object")
        client = data.get("client")
        if not isinstance(client, dict):
            raise ConfigError(f'{source}: "client" must be an object with "name" and "key_file"')
        self.client_name: str = _get(client, "name", str, "client")
        self.key_file: str = _get(client, "key_file", str, "client")
        self.signing_key_file: str | None = _signing_key_file(client, data)
        trust = data.get("trust", "trusted")  # absent: an inventory from before the trust mode
        if trust not in TRUST_MODES:
            raise ConfigError(f'{source}: "trust" must be "untrusted" or "trusted", got {trust!r}')
        self.trust: str = trust
        builders = data.get("builders")
        if not isinstance(builders, list) or not builders:
            raise ConfigError(f'{source}: "builders" must be a non-empty list')
        self.builders = [
            Builder(b if isinstance(b, dict) else {}, f"builders[{i}]") for i, b in enumerate(builders)
        ]
        names = [b.name for b in self.builders]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"{source}: builder names must be unique; repeated: {', '.join(duplicates)}")


def _signing_key_file(client: dict[str, Any], top: dict[str, Any]) -> str | None:
    """client.signing_key_file; a top-level signing_key_file is read too (where a client module
    put it beside "trust"), and the two may not disagree."""
    found: dict[str, str] = {}
    for where, data in (("client.signing_key_file", client), ("signing_key_file", top)):
        value = data.get("signing_key_file")
        if value is None:
            continue
        if not isinstance(value, str) or not value.startswith("/"):
            raise ConfigError(f"{where}: must be an absolute path or null, got {value!r}")
        found[where] = value
    if len(set(found.values())) > 1:
        raise ConfigError(f"client.signing_key_file and signing_key_file disagree: {found}")
    return next(iter(found.values()), None)


def _get(data: dict[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    if key not in data:
        if default is None:
            raise ConfigError(f"{where}.{key}: missing")
        return default
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}.{key}: must be a {kind.__name__}, got {value!r}")
    return value


def _strings(data: dict[str, Any], key: str, where: str, default: list[str] | None = None) -> list[str]:
    value = _get(data, key, list, where, default)
    if not all(isinstance(v, str) and v and " " not in v and "," not in v for v in value):
        raise ConfigError(f"{where}.{key}: must be a list of words (no spaces or commas)")
    return list(value)


def load_inventory(path: str) -> Inventory:
    """Read and validate the inventory file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_INVENTORY_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the inventory: {e.strerror}") from None
    if len(raw) > MAX_INVENTORY_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_INVENTORY_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    return Inventory(data, path)
