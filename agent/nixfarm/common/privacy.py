"""What a key sees of other clients: their names only where the builder shares them.

A metrics-role key (a dashboard, a monitoring host) reads a builder's
snapshots and accounts; unless the builder's configuration says
`share_client_names`, every client but the key's own shows as OTHERS there,
with their numbers added together. Build and admin keys see the names:
their dispatchers share a builder's slots among the clients by name.
"""

from __future__ import annotations

from typing import Any

OTHERS = "(others)"


def _name(name: str, viewer: str) -> str:
    return name if name == viewer else OTHERS


def _merge_counts(by_client: dict[str, Any], viewer: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in by_client.items():
        key = _name(name, viewer)
        if isinstance(value, dict):
            merged = out.setdefault(key, {})
            for counter, amount in value.items():
                merged[counter] = merged.get(counter, 0) + amount
        else:
            out[key] = out.get(key, 0) + value
    return out


def snapshot_for(snapshot: dict[str, Any], viewer: str) -> dict[str, Any]:
    """The snapshot as `viewer` may see it: other clients' names replaced."""
    builds = dict(snapshot.get("builds") or {})
    for key in ("sessions_by_client", "demand_by_client"):
        if isinstance(builds.get(key), dict):
            builds[key] = _merge_counts(builds[key], viewer)
    if isinstance(builds.get("running"), list):
        builds["running"] = [{**b, "client": _name(b["client"], viewer)} for b in builds["running"]]
    return {**snapshot, "builds": builds}


def report_for(report: dict[str, Any], viewer: str) -> dict[str, Any]:
    """An accounts report as `viewer` may see it: other clients added up under OTHERS."""
    return {**report, "clients": _merge_counts(report["clients"], viewer)}
