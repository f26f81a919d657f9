"""`nixfarm status`: the builders as the dispatcher sees them, and the line Nix sees."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ..common.errors import EnvironmentProblem

DEFAULT_MACHINES = "/var/lib/nixfarm-client/machines"
STATUS_NAME = "dispatch-status.json"  # beside the machines file


def status_path(machines_path: str) -> str:
    """Where the dispatcher writing `machines_path` keeps its status."""
    return os.path.join(os.path.dirname(machines_path) or ".", STATUS_NAME)


def read_status(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(16 << 20))
    except FileNotFoundError:
        raise EnvironmentProblem(
            f"no dispatcher status at {path}: is nixfarm dispatch running? "
            "(--machines names its machines file)"
        ) from None
    except (OSError, ValueError) as e:
        raise EnvironmentProblem(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("builders"), list):
        raise EnvironmentProblem(f"{path} is not a dispatcher status file")
    return data


def _ago(t: float | None, now: float) -> str:
    """How long ago, in at most 4 characters: 12s, 5m, 3h, 2d."""
    if t is None:
        return "never"
    seconds = max(0.0, now - t)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _gib(n: int | None) -> str:
    if n is None:
        return "-"
    gib = n / 2**30
    return f"{gib:.1f}G" if gib < 100 else f"{gib:.0f}G"  # at most 5 characters below 100 TiB


def rows(status: dict[str, Any], now: float) -> list[dict[str, str]]:
    """One row of strings per builder (the table and tests read these)."""
    out = []
    for b in status["builders"]:
        snap = b.get("snapshot") or {}
        builds = snap.get("builds") or {}
        psi = snap.get("psi") or {}
        gc = snap.get("gc") or {}
        store = snap.get("store") or {}
        cfg = snap.get("nix_config") or {}
        load = snap.get("load") or {}
        out.append({
            "builder": b["name"],
            "state": b["state"],
            "reason": b.get("reason") or "",
            "jobs": f"{builds.get('active', '-')}/{cfg.get('max_jobs', '-')}",
            # Slots of the line that this client's Nix finds taken: left to other clients.
            "held back": "-" if b.get("held_back") is None else str(b["held_back"]),
            # Builds the builder may take beyond its capacity: its slots free up at that pace.
            "ahead": str(b.get("ahead", "-")),
            # This client's builds there or on their way (its Nix's hooks' slot locks).
            "mine": "-" if b.get("in_flight") is None else str(b["in_flight"]),
            "load": f"{load['avg1']:.2f}" if "avg1" in load else "-",
            "cpu psi": f"{psi['cpu_some_avg10']:.0f}%" if "cpu_some_avg10" in psi else "-",
            "free disk": _gib(store.get("free_bytes")),
            "gc": "running" if gc.get("running") else ("error" if gc.get("error") else "idle"),
            "last seen": _ago(b.get("last_seen"), now),
            "nix sees": b.get("line") or "(left out)",
        })  # fmt: skip
    return out


# The table's columns: a row's key and its header, short enough that the table fits
# 80 columns with builder names of up to 16 characters (docs/client.md, "nixfarm status").
COLUMNS = (
    ("builder", "builder"), ("state", "state"), ("jobs", "jobs"), ("mine", "mine"),
    ("held back", "held"), ("ahead", "ahead"), ("load", "load"), ("cpu psi", "cpu"),
    ("free disk", "free"), ("gc", "gc"), ("last seen", "seen"),
)  # fmt: skip


def render(status: dict[str, Any], now: float, limit: int | None = None) -> Any:
    """A rich Table of the status, then each builder's reason and what Nix sees; with
    `limit`, at most that many builders (the ones not healthy first) and a line saying
    how many more there are, without the lines Nix sees."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    colours = {"healthy": "green", "degraded": "yellow", "down": "red"}
    table = Table(
        title=f"builders of client {status.get('client', '?')}, "
        f"updated {_ago(status.get('updated'), now)} ago",
        box=None,
        header_style="bold",
        collapse_padding=True,
        pad_edge=False,
    )
    data = rows(status, now)
    left_out = 0
    if limit is not None and len(data) > limit:
        order = {"down": 0, "degraded": 1}
        data = sorted(data, key=lambda row: order.get(row["state"], 2))
        left_out, data = len(data) - limit, data[:limit]
    for _, header in COLUMNS:
        # Never folded mid-word: a builder name too long for the screen is cut with "…".
        table.add_column(header, no_wrap=True, overflow="ellipsis")
    for row in data:
        colour = colours.get(row["state"], "white")
        table.add_row(*[f"[{colour}]{row[key]}[/]" if key == "state" else row[key] for key, _ in COLUMNS])
    # Reasons and machines lines are long (key path, base64 host key): below the table,
    # each on one line however wide, so that it can be copied whole or grepped.
    # (The caller prints with soft_wrap: rich would otherwise fold or crop them.)
    notes = Text()
    for row in data:
        if row["reason"]:
            notes.append(f"{row['builder']}: {row['state']}: {row['reason']}\n")
    if left_out:
        healthy = sum(1 for b in status["builders"] if b["state"] == "healthy")
        notes.append(
            f"{left_out} more builders ({healthy} healthy in all); `nixfarm status` lists every one",
            style="dim",
        )
        return Group(table, notes)
    notes.append(f"\nwhat Nix sees in {status.get('machines_file', '?')}:\n", style="bold")
    for row in data:
        notes.append(f"{row['builder']}: {row['nix sees']}\n", style="dim" if row["state"] == "down" else "")
    return Group(table, notes)


def run_status(machines_path: str, as_json: bool, watch: bool) -> int:
    """Print the status once, or redraw it every second with --watch."""
    path = status_path(machines_path)
    if as_json and not watch:
        print(json.dumps(read_status(path), sort_keys=True))
        return 0
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if not watch:
        console.print(render(read_status(path), time.time()), soft_wrap=True)
        return 0

    def screen() -> Any:
        # As many builders as fit (a row is one line, the table's frame and title ~6 more):
        # rich draws the whole renderable before it crops it to the screen.
        return render(read_status(path), time.time(), limit=max(5, console.size.height - 8))

    # Drawn once a second, when the "ago" columns change; not also by rich's own refresh thread.
    with Live(screen(), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(1)
            live.update(screen(), refresh=True)
