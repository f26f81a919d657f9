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


# Settings whose own name starts with "extra-": setting them is not an append.
_EXTRA_NAMED = frozenset({"extra-platforms"})


def read_settings(path: str) -> dict[str, str]:
    """The raw settings of a nix.conf and its includes (missing file: empty).

    Lines apply in order, as in Nix: `X = v` sets X and drops what earlier
    `extra-X` lines appended; `extra-X = v` appends, kept under "extra-X" so
    that callers can add it to X's value or to X's default.
    """
    settings: dict[str, str] = {}
    _read_into(settings, path, 0)
    return settings


def _read_into(settings: dict[str, str], path: str, depth: int) -> None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split(None, 1)
        if words[0] in ("include", "!include") and len(words) == 2:
            if depth < _MAX_INCLUDE_DEPTH:
                _read_into(settings, os.path.join(os.path.dirname(path), words[1].strip()), depth + 1)
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key.startswith("extra-") and key not in _EXTRA_NAMED:
            settings[key] = f"{settings.get(key, '')} {value}".strip()
        else:
            settings[key] = value
            settings.pop(f"extra-{key}", None)


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


def _size_or(value: str | None, default: int | None) -> int | None:
    """A size setting, or `default` where it is unset or not a size Nix would accept."""
    if value is None:
        return default
    try:
        return parse_size(value)
    except UsageError:
        return default


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
    min_free = _size_or(raw.get("min-free"), 0) or 0
    max_free = _size_or(raw.get("max-free"), None)
    if max_free is not None and max_free >= UNLIMITED:
        max_free = None
    system = raw.get("system", default_system())
    # `extra-platforms` is a setting of its own name; its `extra-` form appends to it.
    # Nix's default for it adds i686-linux on x86_64-linux (and, on some CPUs,
    # x86_64-v2/v3 names we do not probe for).
    default_extra = "i686-linux" if system == "x86_64-linux" else ""
    systems = [
        system,
        *raw.get("extra-platforms", default_extra).split(),
        *raw.get("extra-extra-platforms", "").split(),
    ]
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
