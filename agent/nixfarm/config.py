"""The agent's configuration: a small JSON file, validated at start.

On NixOS the builder module writes it with `pkgs.formats.json`. Every key is
optional; an unknown key or a value of the wrong type is an error that names
the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError

DEFAULT_PATH = "/etc/nixfarm/agent.json"
# A config file is a few hundred bytes; refuse to parse anything absurd.
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class AgentConfig:
    """Settings of the builder-side agent and gateway."""

    store_dir: str = "/nix/store"
    state_dir: str = "/var/lib/nixfarm"
    nix_conf_dir: str = field(default_factory=lambda: os.environ.get("NIX_CONF_DIR", "/etc/nix"))
    build_users_group: str = "nixbld"
    nix_daemon_unit: str = "nix-daemon.service"
    # Where nix-daemon and nix-store are; empty means the fixed search path in gateway.py.
    nix_bin_dir: str = ""
    # Log file for gateway decisions where there is no journal; empty: stderr.
    gateway_log: str = ""
    # Interfaces whose traffic counts; empty: every interface but loopback.
    network_interfaces: tuple[str, ...] = ()
    # Longest a remote `nixfarm stream` may run, a guard against forgotten sessions.
    stream_max_seconds: float = 7 * 24 * 3600.0


_TYPES: dict[str, type | tuple[type, ...]] = {
    "store_dir": str,
    "state_dir": str,
    "nix_conf_dir": str,
    "build_users_group": str,
    "nix_daemon_unit": str,
    "nix_bin_dir": str,
    "gateway_log": str,
    "network_interfaces": list,
    "stream_max_seconds": (int, float),
}


def parse_config(data: Any, source: str) -> AgentConfig:
    """Validate a decoded JSON value and return the config it describes."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object")
    known = {f.name for f in fields(AgentConfig)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        expected = _TYPES[key]
        if isinstance(value, bool) or not isinstance(value, expected):
            names = expected.__name__ if isinstance(expected, type) else "number"
            raise ConfigError(f"{source}: key {key!r} must be a {names}, got {value!r}")
        values[key] = value
    if "network_interfaces" in values:
        ifaces = values["network_interfaces"]
        if not all(isinstance(i, str) for i in ifaces):
            raise ConfigError(f"{source}: key 'network_interfaces' must be a list of strings")
        values["network_interfaces"] = tuple(ifaces)
    if values.get("stream_max_seconds", 1) <= 0:
        raise ConfigError(f"{source}: key 'stream_max_seconds' must be positive")
    return AgentConfig(**values)


def load_config(path: str | None = None) -> AgentConfig:
    """Load the config from `path`, $NIXFARM_CONFIG, or the default location.

    A missing file is fine only at the default location (all defaults then);
    a file named explicitly must exist.
    """
    explicit = path or os.environ.get("NIXFARM_CONFIG")
    target = explicit or DEFAULT_PATH
    try:
        with open(target, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{target}: config file not found") from None
        return AgentConfig()
    except OSError as e:
        raise ConfigError(f"{target}: cannot read config: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{target}: config file larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{target}: not valid JSON: {e}") from None
    return parse_config(data, target)
