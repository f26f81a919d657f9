"""The cost of a farm of B builders x C clients, from the unit costs the benchmarks measured.

    .venv/bin/python bench/farm_cost.py [bench/results-streams.json] [bench/results-client.json]

Builder side (bench_streams.py, idle builder, streams at 2 s): nixfarm's CPU
and PSS as a line through the runs with 20 and 100 streams (the agent's own
cost, plus each stream's), sshd's per connection. Client side
(bench_client.py): the dispatcher's CPU, PSS and open files as a line
through the runs with 100 and 300 builders. Prints a Markdown table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FARMS = ((10, 50), (100, 300), (300, 1000))


def line(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float]:
    """(intercept, slope) of the line through two points."""
    slope = (y1 - y0) / (x1 - x0)
    return y0 - slope * x0, slope


def builder_units(streams: dict[str, Any], code: str) -> dict[str, tuple[float, float]]:
    runs = {m["streams"]: m for m in streams["streams"] if m["code"] == code and m["extra_processes"] == 0}
    lo, hi = sorted(runs)[0], sorted(runs)[-1]
    sshd = [m["sshd"] for m in runs.values()]
    return {
        "cpu": line(lo, runs[lo]["nixfarm"]["cpu_percent"], hi, runs[hi]["nixfarm"]["cpu_percent"]),
        "pss": line(lo, runs[lo]["nixfarm"]["pss_mib"], hi, runs[hi]["nixfarm"]["pss_mib"]),
        "sshd_cpu": (0.0, sum(s["cpu_percent_per_stream"] for s in sshd) / len(sshd)),
        "sshd_pss": (0.0, sum(s["pss_mib_per_stream"] for s in sshd) / len(sshd)),
    }


def client_units(client: dict[str, Any], code: str) -> dict[str, tuple[float, float]]:
    runs = {r["builders"]: r[code] for r in client["runs"] if "failed" not in r.get(code, {"failed": 1})}
    lo, hi = sorted(runs)[0], sorted(runs)[-1]
    return {
        key: line(lo, runs[lo][key], hi, runs[hi][key]) for key in ("cpu_percent", "pss_mib", "open_files")
    }


def at(unit: tuple[float, float], x: float) -> float:
    return unit[0] + unit[1] * x


def table(streams: dict[str, Any], client: dict[str, Any]) -> str:
    b = builder_units(streams, "new")
    old = builder_units(streams, "old")
    c = client_units(client, "new-nix-names")
    out = [
        "| Farm (B x C) | SSH sessions | per builder: nixfarm CPU, PSS | per builder: sshd PSS "
        "| per builder before (old streams) | per client: dispatcher CPU, PSS, open files |",
        "|---|---|---|---|---|---|",
    ]
    for builders, clients in FARMS:
        out.append(
            f"| {builders} x {clients} | {builders * clients:,} "
            f"| {at(b['cpu'], clients):.1f}%, {at(b['pss'], clients):.0f} MiB "
            f"| {at(b['sshd_pss'], clients):,.0f} MiB "
            f"| {at(old['cpu'], clients):.0f}%, {at(old['pss'], clients):,.0f} MiB "
            f"| {at(c['cpu_percent'], builders):.1f}%, {at(c['pss_mib'], builders):.0f} MiB, "
            f"{at(c['open_files'], builders):,.0f} |"
        )
    units = (
        f"Units: nixfarm on a builder {b['cpu'][0]:.2f}% + {b['cpu'][1]:.4f}% per stream, "
        f"{b['pss'][0]:.1f} MiB + {b['pss'][1]:.2f} MiB per stream (before: {old['cpu'][1]:.2f}% and "
        f"{old['pss'][1]:.1f} MiB per stream); sshd {b['sshd_pss'][1]:.2f} MiB and "
        f"{b['sshd_cpu'][1]:.4f}% per connection; a dispatcher {c['cpu_percent'][0]:.2f}% + "
        f"{c['cpu_percent'][1]:.4f}% per builder, {c['pss_mib'][0]:.1f} MiB + {c['pss_mib'][1]:.3f} MiB "
        f"per builder, {c['open_files'][0]:.0f} + {c['open_files'][1]:.2f} open files per builder."
    )
    return "\n".join(out) + "\n\n" + units


def main() -> int:
    paths = [Path(p) for p in sys.argv[1:3]] or [HERE / "results-streams.json", HERE / "results-client.json"]
    streams, client = (json.loads(p.read_text()) for p in paths)
    print(table(streams, client))
    return 0


if __name__ == "__main__":
    sys.exit(main())
