"""The agent's configuration: a small JSON file, validated at start.

On NixOS the builder module writes it with `pkgs.formats.json`. Every key is
optional; an unknown key or a value of the wrong type is an error that names
the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
import math
import os

from ..common.errors import ConfigError, UsageError

TYPE_CHECKING = False  # see cli.py: the gateway path avoids importing typing
if TYPE_CHECKING:
    from typing import Any

DEFAULT_PATH = "/etc/nixfarm/agent.json"
# A config file is a few hundred bytes; refuse to parse anything absurd.
MAX_CONFIG_BYTES = 1 << 20


# Every key the config file may have, and the JSON type it must be.
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
    "min_free": (int, str),
    "max_free": (int, str),
    "gc_check_interval": (int, float),
    "usage_sample_interval": (int, float),
    "snapshot_interval": (int, float),
    "control_group": str,
    "share_client_names": bool,
    "prometheus_listen": str,
}


class AgentConfig:
    """Settings of the builder-side agent and gateway (all keys optional).

    A plain class rather than a dataclass: the gateway loads it on every SSH
    session, and importing dataclasses costs ~6 ms there.
    """

    store_dir: str = "/nix/store"
    state_dir: str = "/var/lib/nixfarm"
    nix_conf_dir: str = "/etc/nix"  # $NIX_CONF_DIR when set
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
    # GC limits: bytes, "16M", "10G" or "10%" of the store's filesystem; "" means
    # nix.conf's min-free / max-free. A min-free of 0 turns the agent's GC off.
    min_free: int | str = ""
    max_free: int | str = ""
    # Seconds between free-space checks (a statvfs: cheap) and usage samples.
    gc_check_interval: float = 1.0
    usage_sample_interval: float = 1.0
    # Seconds between the agent's snapshots, which it serves to every stream of at least
    # this interval (relay.py); streams of a shorter one take their own.
    snapshot_interval: float = 1.0
    # Group allowed to use the agent's control socket (gc --now / --dry-run); "": root only.
    control_group: str = ""
    # May a metrics-role key see other clients' names (running builds, accounts)?
    share_client_names: bool = False
    # "ADDRESS:PORT" where the agent serves Prometheus metrics over HTTP; "": not at all.
    prometheus_listen: str = ""

    def __init__(self, **values: object) -> None:
        for key in values:
            if key not in _TYPES:
                raise TypeError(f"AgentConfig has no field {key!r}")
        values.setdefault("nix_conf_dir", os.environ.get("NIX_CONF_DIR", AgentConfig.nix_conf_dir))
        for key in _TYPES:
            object.__setattr__(self, key, values.get(key, getattr(AgentConfig, key)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AgentConfig) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError("AgentConfig is read-only")

    def __repr__(self) -> str:
        return f"AgentConfig({self.__dict__!r})"


def parse_config(data: Any, source: str) -> AgentConfig:
    """Validate a decoded JSON value and return the config it describes."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object")
    known = set(_TYPES)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        expected = _TYPES[key]
        if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
            names = expected.__name__ if isinstance(expected, type) else "number"
            raise ConfigError(f"{source}: key {key!r} must be a {names}, got {value!r}")
        values[key] = value
    if "network_interfaces" in values:
        ifaces = values["network_interfaces"]
        if not all(isinstance(i, str) for i in ifaces):
            raise ConfigError(f"{source}: key 'network_interfaces' must be a list of strings")
        values["network_interfaces"] = tuple(ifaces)
    for key in ("min_free", "max_free"):
        if isinstance(values.get(key), str) and values[key] != "":
            _check_limit(values[key], f"{source}: key {key!r}")
    for key in ("stream_max_seconds", "gc_check_interval", "usage_sample_interval", "snapshot_interval"):
        if not 0 < values.get(key, 1) < math.inf:
            raise ConfigError(f"{source}: key {key!r} must be a positive number of seconds")
    if values.get("prometheus_listen"):
        _check_listen(values["prometheus_listen"], f"{source}: key 'prometheus_listen'")
    return AgentConfig(**values)


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION = 10 * 365 * 86400


def parse_duration(text: str) -> float:
    """Seconds of "90", "90s", "30m", "12h", "7d" or "2w"; ValueError if it is none of these."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _DURATION_UNITS else (text, "s")
    if not number.isdigit() or len(number) > 9:
        raise ValueError(f"{text!r} is not a duration (e.g. 90m, 12h, 7d)")
    seconds = int(number) * _DURATION_UNITS[unit]
    if not 0 < seconds <= MAX_DURATION:
        raise ValueError(f"{text!r} is out of range (1 s to 10 years)")
    return float(seconds)


def split_listen(text: str) -> tuple[str, int]:
    """("ADDRESS", PORT) of "ADDRESS:PORT" or "[IPV6]:PORT"; ValueError if it is neither."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(text)
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(text)
        host = host[1:-1]
    return host, int(port)


def _check_listen(text: str, where: str) -> None:
    try:
        split_listen(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not ADDRESS:PORT (e.g. 0.0.0.0:9716 or [::]:9716)") from None


def _check_limit(text: str, where: str) -> None:
    """A size ("16M") or a percentage ("10%"); the bytes a percentage means come later."""
    from ..common.nixconf import parse_size

    try:
        if text.strip().endswith("%"):
            if not 0 <= float(text.strip()[:-1]) <= 100:
                raise ValueError
        else:
            parse_size(text)
    except (ValueError, UsageError):
        raise ConfigError(f"{where}: {text!r} is not a size or percentage (e.g. 16M, 10G, 10%)") from None


def _reject_constant(name: str) -> None:
    # Python's json accepts NaN and Infinity; JSON does not, and a NaN limit compares false.
    raise ValueError(f"{name} is not a JSON number")


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
        data = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise ConfigError(f"{target}: not valid JSON: {e}") from None
    return parse_config(data, target)
