"""Read the few nix.conf settings the metrics report, the way Nix reads them.

We parse the file rather than run `nix show-config`: one snapshot must cost
milliseconds, not a process. Supported: `key = value`, comments, `extra-`
prefixed keys (appended), and `include` / `!include` relative to the file.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass

from .errors import UsageError

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)\s*$", re.IGNORECASE)
_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# Nix's default max-free is "unlimited" (the largest uint64).
UNLIMITED = (1 << 64) - 1
_MAX_INCLUDE_DEPTH = 8


def parse_size(text: str) -> int:
    """Parse a Nix size ("1073741824", "512M", "10G") into bytes."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"not a size: {text!r} (use bytes or a K/M/G/T suffix, e.g. 10G)")
    return int(m.group(1)) * _UNIT[m.group(2).upper()]


def read_settings(path: str, depth: int = 0) -> dict[str, str]:
    """Return the raw settings of a nix.conf and its includes (missing file: empty).

    A key set with an `extra-` prefix is kept under that prefixed name, with
    every occurrence appended, so callers can add it to the base value or its
    default.
    """
    settings: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return settings
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split(None, 1)
        if words[0] in ("include", "!include") and len(words) == 2 and depth < _MAX_INCLUDE_DEPTH:
            inc = os.path.join(os.path.dirname(path), words[1].strip())
            settings.update(read_settings(inc, depth + 1))
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key.startswith("extra-"):
            settings[key] = f"{settings.get(key, '')} {value}".strip()
        else:
            settings[key] = value
    return settings


@dataclass(frozen=True)
class NixSettings:
    """The builder's configured capacity, as nix-daemon sees it."""

    max_jobs: int
    cores: int
    min_free_bytes: int
    max_free_bytes: int | None  # None: unlimited (Nix's default)
    systems: tuple[str, ...]
    features: tuple[str, ...]


def default_system() -> str:
    """Nix's name for this machine's platform, e.g. x86_64-linux."""
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())
    return f"{machine}-linux"


def _default_features() -> list[str]:
    # What Nix enables when system-features is not set (libstore/globals.cc).
    features = ["nixos-test", "benchmark", "big-parallel"]
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        features.append("kvm")
    return features


def _int_or(value: str | None, default: int, cpus: int) -> int:
    if value is None:
        return default
    if value == "auto":
        return cpus
    try:
        return int(value)
    except ValueError:
        return default


def load_nix_settings(conf_dir: str) -> NixSettings:
    """Read nix.conf in `conf_dir` and fill in Nix's defaults."""
    raw = read_settings(os.path.join(conf_dir, "nix.conf"))
    cpus = os.cpu_count() or 1
    try:
        min_free = parse_size(raw.get("min-free", "0"))
        max_free: int | None = parse_size(raw["max-free"]) if "max-free" in raw else None
    except UsageError:
        min_free, max_free = 0, None
    if max_free is not None and max_free >= UNLIMITED:
        max_free = None
    system = raw.get("system", default_system())
    # `extra-platforms` is a setting of its own name; its `extra-` form appends to it.
    systems = [system, *raw.get("extra-platforms", "").split()]
    features = raw["system-features"].split() if "system-features" in raw else _default_features()
    features += raw.get("extra-system-features", "").split()
    return NixSettings(
        max_jobs=_int_or(raw.get("max-jobs"), 1, cpus),
        cores=_int_or(raw.get("cores"), 0, cpus),
        min_free_bytes=min_free,
        max_free_bytes=max_free,
        systems=tuple(dict.fromkeys(systems)),
        features=tuple(dict.fromkeys(features)),
    )
