"""The metrics snapshot's schema: what a builder sends and what a client accepts.

The builder's agent writes snapshots (metrics.py); a client's dispatcher,
`doctor` and `builds` read them from the network, so every field they use
is checked here, with bounded sizes, before anything trusts it. The fields
are documented in docs/metrics.md.
"""

from __future__ import annotations

import json
from typing import Any

SCHEMA = 1
MAX_LINE = 1 << 20  # a snapshot is ~1.5 KiB; a megabyte is hostile
MAX_BUILDS = 4096  # entries in a snapshot's lists of build times
MAX_WAITING = 1_000_000  # builds one client may say it has waiting (demand.py)


def is_count(value: object) -> bool:
    """A count of waiting builds as a record or a snapshot may hold it."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_WAITING


class BadSnapshot(Exception):
    """The stream sent something that is not a snapshot we can use."""


def validate(line: bytes) -> dict[str, Any]:
    """A decoded, checked snapshot, or BadSnapshot saying what is wrong with it.

    UTF-8 only (json.loads would take UTF-16 and -32 bytes too): the
    dispatcher's status holds the line as it came (BuilderState.status_json).
    """
    try:
        snap = json.loads(line.decode())
    except json.JSONDecodeError as e:
        raise BadSnapshot(f"not JSON ({e.msg} at byte {e.pos})") from None
    except UnicodeDecodeError:
        raise BadSnapshot("not UTF-8 text") from None
    if not isinstance(snap, dict):
        raise BadSnapshot("not a JSON object")
    if snap.get("schema") != SCHEMA:
        raise BadSnapshot(f"schema version {snap.get('schema')!r}, this dispatcher reads {SCHEMA}")
    try:
        checks = [
            snap["nix_config"]["max_jobs"],
            snap["builds"]["active"],
            snap["store"]["free_bytes"],
            snap["store"]["total_bytes"],
        ]
        sessions = snap["builds"].get("sessions_by_client", {})
        ages, finished = snap["builds"].get("ages_seconds", []), snap["builds"].get("finished", [])
    except (KeyError, TypeError) as e:
        raise BadSnapshot(f"missing field {e}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in checks):
        raise BadSnapshot("max_jobs, active builds and store sizes must be non-negative integers")
    if not isinstance(sessions, dict) or not set(map(type, sessions.values())) <= {int}:
        raise BadSnapshot("builds.sessions_by_client must map client names to counts")
    demand = snap["builds"].get("demand_by_client", {})
    counts = demand.values() if isinstance(demand, dict) else [None]
    if len(demand) > MAX_BUILDS or not all(is_count(v) for v in counts):
        raise BadSnapshot(f"builds.demand_by_client must map at most {MAX_BUILDS} client names to counts")
    if not isinstance(ages, list) or not isinstance(finished, list):
        raise BadSnapshot("builds.ages_seconds and builds.finished must be lists")
    if len(ages) > MAX_BUILDS or len(finished) > MAX_BUILDS:
        raise BadSnapshot(f"builds.ages_seconds and builds.finished: at most {MAX_BUILDS} entries")
    # Checked a list at a time (a snapshot has a few hundred numbers, and 150 snapshots a second
    # come from 300 builders): the types of all items at once, then their range.
    pairs = set(map(type, finished)) <= {list} and set(map(len, finished)) <= {2}
    if not pairs or not _all_seconds([*ages, *(t for p in finished for t in p)]):
        raise BadSnapshot("builds.finished must hold [seconds ago, seconds it ran] pairs of numbers >= 0")
    _check_running(snap["builds"].get("running", []))
    return snap


def _check_running(running: Any) -> None:
    """builds.running: what `nixfarm builds` shows of each running build (accounts.py)."""
    if not isinstance(running, list) or len(running) > MAX_BUILDS:
        raise BadSnapshot(f"builds.running must be a list of at most {MAX_BUILDS} builds")
    for build in running:
        if not (
            isinstance(build, dict)
            and isinstance(build.get("client"), str)
            and len(build["client"]) <= 64
            and isinstance(build.get("name"), str)
            and len(build["name"]) <= 200
            and _seconds(build.get("seconds"))
            and _seconds(build.get("cpu_seconds"))
        ):
            raise BadSnapshot("builds.running must hold {client, name, seconds, cpu_seconds} of each build")


def _seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e9


def _all_seconds(values: list[Any]) -> bool:
    """_seconds() of every value (a bool's type is not int; a NaN fails the range)."""
    return set(map(type, values)) <= {int, float} and all(0 <= v < 1e9 for v in values)
