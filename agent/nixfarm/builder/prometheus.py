"""A metrics snapshot in the Prometheus text exposition format (version 0.0.4).

Names follow Prometheus conventions: a `nixfarm_` prefix, the unit in the name
(`_bytes`, `_seconds`, `_ratio`), `_total` on counters, and `_info` metrics
with value 1 for facts that are labels. Unknown values are left out rather
than reported as zero; "no limit" is +Inf.
"""

from __future__ import annotations

import math
from typing import Any

Sample = tuple[dict[str, str], float]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, samples: list[Sample]) -> None:
        samples = [(labels, value) for labels, value in samples if value is not None]
        if not samples:
            return
        self.lines.append(f"# HELP nixfarm_{name} {help_text}")
        self.lines.append(f"# TYPE nixfarm_{name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            suffix = f"{{{label_text}}}" if label_text else ""
            self.lines.append(f"nixfarm_{name}{suffix} {_format_value(value)}")

    def gauge(self, name: str, help_text: str, value: float | None) -> None:
        self.metric(name, "gauge", help_text, [({}, value)] if value is not None else [])


# Per-client counters (accounts.py): the counter, its metric name and help.
CLIENT_COUNTERS = (
    ("builds_started", "client_builds_started_total", "Builds started for each client."),
    ("builds_finished", "client_builds_finished_total", "Builds finished with valid outputs, per client."),
    ("builds_failed", "client_builds_failed_total", "Builds that failed, per client."),
    ("build_seconds", "client_build_seconds_total", "Wall-clock seconds of each client's ended builds."),
    ("cpu_seconds", "client_cpu_seconds_total", "CPU seconds of each client's ended builds (sampled)."),
    ("received_bytes", "client_received_bytes_total", "Bytes received on each client's SSH connections."),
    ("sent_bytes", "client_sent_bytes_total", "Bytes sent on each client's SSH connections."),
)


def render(snap: dict[str, Any], accounts: dict[str, dict[str, float]] | None = None) -> str:
    """The snapshot (and, if given, the per-client accounts) as Prometheus text; ends with a newline."""
    w = _Writer()
    info = {
        "hostname": snap["hostname"],
        "version": snap["agent_version"],
        "schema": str(snap["schema"]),
    }
    w.metric("agent_info", "gauge", "Agent version and host name.", [(info, 1)])
    w.metric(
        "system_info",
        "gauge",
        "Systems this builder builds for.",
        [({"system": s}, 1) for s in snap["systems"]],
    )
    w.metric(
        "feature_info",
        "gauge",
        "System features this builder offers.",
        [({"feature": f}, 1) for f in snap["features"]],
    )
    w.gauge("snapshot_timestamp_seconds", "When this snapshot was taken (Unix time).", snap["timestamp"])
    w.gauge("cpus", "CPUs available to the agent.", snap["cpus"])
    load = snap["load"]
    w.gauge("load1", "1-minute load average.", load["avg1"])
    w.gauge("load5", "5-minute load average.", load["avg5"])
    w.gauge("load15", "15-minute load average.", load["avg15"])
    psi = snap["psi"] or {}
    pressure = []
    for key, value in sorted(psi.items()):
        resource, kind, _ = key.split("_", 2)
        pressure.append(({"resource": resource, "kind": kind}, value / 100.0))
    w.metric(
        "pressure_avg10_ratio",
        "gauge",
        "Pressure stall information, 10-second average, as a ratio.",
        pressure,
    )
    w.gauge("memory_total_bytes", "Total memory.", snap["memory"].get("total_bytes"))
    w.gauge("memory_available_bytes", "Available memory.", snap["memory"].get("available_bytes"))
    store = snap["store"]
    w.gauge(
        "store_free_bytes",
        "Free bytes on the Nix store filesystem (for unprivileged users).",
        store["free_bytes"],
    )
    w.gauge("store_size_bytes", "Size of the Nix store filesystem.", store["total_bytes"])
    w.gauge("store_free_inodes", "Free inodes on the Nix store filesystem.", store["free_inodes"])
    w.gauge("store_inodes", "Inodes of the Nix store filesystem.", store["total_inodes"])
    mem = snap["nix_daemon_memory"]
    w.gauge("daemon_memory_current_bytes", "Memory used by nix-daemon's cgroup.", mem["current_bytes"])
    if mem["source"] is not None:
        cap = math.inf if mem["max_bytes"] is None else mem["max_bytes"]
        w.gauge("daemon_memory_max_bytes", "Memory cap of nix-daemon's cgroup (+Inf: none).", cap)
    if mem["oom_kills"] is not None:
        w.metric(
            "daemon_oom_kills_total",
            "counter",
            "OOM kills in nix-daemon's cgroup.",
            [({}, mem["oom_kills"])],
        )
    w.gauge(
        "active_builds",
        "Builds running on this builder, from all clients.",
        snap["builds"]["active"],
    )
    cfg = snap["nix_config"]
    w.gauge("max_jobs", "Configured max-jobs.", cfg["max_jobs"])
    w.gauge("cores", "Configured cores per build (0: all).", cfg["cores"])
    w.gauge("min_free_bytes", "Configured min-free.", cfg["min_free_bytes"])
    max_free = math.inf if cfg["max_free_bytes"] is None else cfg["max_free_bytes"]
    w.gauge("max_free_bytes", "Configured max-free (+Inf: unlimited).", max_free)
    net = snap["network"]
    if net:
        w.metric(
            "network_receive_bytes_total",
            "counter",
            "Bytes received on counted interfaces.",
            [({}, net["rx_bytes_total"])],
        )
        w.metric(
            "network_transmit_bytes_total",
            "counter",
            "Bytes sent on counted interfaces.",
            [({}, net["tx_bytes_total"])],
        )
    gc = snap["gc"]
    w.gauge("gc_running", "1 while a store GC pass runs.", 1 if gc["running"] else 0)
    w.gauge("gc_last_run_timestamp_seconds", "When the last GC pass ended (Unix time).", gc["last_run"])
    w.gauge("gc_last_freed_bytes", "Bytes freed by the last GC pass.", gc["bytes_freed"])
    w.gauge("gc_last_duration_seconds", "Duration of the last GC pass.", gc["duration_seconds"])
    running: dict[str, int] = {}
    for build in snap["builds"].get("running") or []:
        running[build["client"]] = running.get(build["client"], 0) + 1
    w.metric(
        "client_running_builds",
        "gauge",
        "Builds running now, per client.",
        [({"client": _client(c)}, n) for c, n in sorted(running.items())],
    )
    for counter, name, help_text in CLIENT_COUNTERS:
        samples = [({"client": _client(c)}, n.get(counter, 0)) for c, n in sorted((accounts or {}).items())]
        w.metric(name, "counter", help_text, samples)
    return "\n".join(w.lines) + "\n"


def _client(name: str) -> str:
    return name or "(local)"  # builds no gateway session started
