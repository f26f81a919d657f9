"""`nixfarm builds` and `nixfarm usage`: what runs where on the farm, and who used how much.

builds: every builder's running builds, from the dispatcher's status file
(each builder's last snapshot, readable by any user of a client), or, with
--inventory, asked of each builder over SSH (`nixfarm metrics --json`
through the gateway): an admin key on a machine without a dispatcher.

usage: each builder's accounts (`nixfarm accounts --since D` through the
gateway, accounts.py), added up by client or by builder, asked with the
inventory's key (root on a client, or an admin's own inventory). A user who
cannot read that key gets the all-time numbers the dispatcher keeps in its
status (it asks every builder every minute).

A builder that does not answer is named, with why, and the exit code is 1;
the others' numbers are still shown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from ..common.errors import UsageError
from ..common.privacy import OTHERS
from .inventory import Builder, Inventory, load_inventory

MAX_CLIENTS = 4097  # accounts.MAX_CLIENTS, and "(others)"
MAX_ANSWER = 16 << 20  # bytes of one builder's JSON line
CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0
LOCAL = "(local)"  # the builder's own builds (accounts.LOCAL, "")
USAGE_COLUMNS = (
    ("builds_started", "started"),
    ("builds_finished", "done"),
    ("builds_failed", "failed"),
    ("build_seconds", "build time"),
    ("cpu_seconds", "cpu time"),
    ("received_bytes", "received"),
    ("sent_bytes", "sent"),
)


def client_label(name: str) -> str:
    return LOCAL if name == "" else name


# -- asking the builders ----------------------------------------------------------


Check = Callable[[bytes], dict[str, Any]]  # a builder's answer, decoded and checked, or ValueError


def check_report(line: bytes) -> dict[str, Any]:
    """`nixfarm accounts` as a builder answered it: per client, counters; ValueError if not."""
    report = json.loads(line)
    clients = report.get("clients") if isinstance(report, dict) else None
    if not isinstance(clients, dict) or len(clients) > MAX_CLIENTS:
        raise ValueError(f"not an accounts report (at most {MAX_CLIENTS} clients)")
    for name, counts in clients.items():
        if len(name) > 64 or not isinstance(counts, dict):
            raise ValueError("an accounts report names clients (at most 64 characters) with their counters")
        for counter, _ in USAGE_COLUMNS:
            value = counts.get(counter, 0)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1e18:
                raise ValueError(f"{counter} of {name!r} is not a count")
    return dict(report)


def check_snapshot(line: bytes) -> dict[str, Any]:
    from ..common.snapshot import BadSnapshot, validate

    try:
        return validate(line)
    except BadSnapshot as e:
        raise ValueError(str(e)) from None


async def _ask(inventory: Inventory, builder: Builder, command: str, check: Check) -> dict[str, Any] | str:
    """One builder's answer to `command`, decoded and checked, or why there is none."""
    import asyncssh

    from .sshconn import connect_options, run_for_line

    options = connect_options(inventory.key_file, builder, connect_timeout=CONNECT_TIMEOUT)
    try:
        async with await asyncio.wait_for(asyncssh.connect(**options), CONNECT_TIMEOUT + 1) as conn:
            answer = await run_for_line(conn, command, MAX_ANSWER, COMMAND_TIMEOUT)
    except (asyncssh.Error, OSError, TimeoutError) as e:
        return f"unreachable: {str(e) or type(e).__name__}"
    if answer.how == "too long":
        return f"answer larger than {MAX_ANSWER} bytes"
    if answer.how == "eof":
        text = answer.stderr.decode(errors="replace").strip().splitlines()
        return f"no answer (exit {answer.status}): {text[-1] if text else 'nothing on stderr'}"
    try:
        return check(answer.line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
        return f"a bad answer: {e}"


def ask_builders(inventory: Inventory, command: str, check: Check) -> dict[str, dict[str, Any] | str]:
    """Every builder's answer, asked at once: name -> its checked answer, or why there is none."""
    logging.getLogger("asyncssh").setLevel(logging.CRITICAL)  # failures are ours to report

    async def all_of_them() -> list[dict[str, Any] | str]:
        return list(await asyncio.gather(*(_ask(inventory, b, command, check) for b in inventory.builders)))

    answers = asyncio.run(all_of_them())
    return {b.name: a for b, a in zip(inventory.builders, answers, strict=True)}


# -- builds ----------------------------------------------------------------------


def running_rows(snapshots: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per running build: builder, client, name, seconds, cpu_seconds (longest first)."""
    rows = []
    for builder, snapshot in snapshots.items():
        for build in (snapshot.get("builds") or {}).get("running") or []:
            if isinstance(build, dict):
                rows.append({
                    "builder": builder,
                    "client": client_label(str(build.get("client", ""))),
                    "name": str(build.get("name", "?")),
                    "seconds": float(build.get("seconds", 0)),
                    "cpu_seconds": float(build.get("cpu_seconds", 0)),
                })  # fmt: skip
    return sorted(rows, key=lambda r: -r["seconds"])


def _snapshots_from_status(machines: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    from .status import read_status, status_path

    status = read_status(status_path(machines))
    snapshots, problems = {}, {}
    for b in status["builders"]:
        if b.get("snapshot"):
            snapshots[b["name"]] = b["snapshot"]
        else:
            problems[b["name"]] = f"{b.get('state', '?')}: {b.get('reason') or 'no snapshot yet'}"
    return snapshots, problems


def _split(answers: dict[str, dict[str, Any] | str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    good = {name: a for name, a in answers.items() if isinstance(a, dict)}
    return good, {name: a for name, a in answers.items() if isinstance(a, str)}


def run_builds(machines: str, inventory_path: str | None, as_json: bool) -> int:
    """`nixfarm builds`: 0, or 1 if a builder could not be asked."""
    if inventory_path:
        inventory = load_inventory(inventory_path)
        snapshots, problems = _split(ask_builders(inventory, "nixfarm metrics --json", check_snapshot))
    else:
        snapshots, problems = _snapshots_from_status(machines)
    rows = running_rows(snapshots)
    if as_json:
        print(json.dumps({"builds": rows, "unavailable": problems}, sort_keys=True))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(box=None, header_style="bold", pad_edge=False)
        for header in ("builder", "client", "derivation", "running", "cpu"):
            table.add_column(header, no_wrap=header != "derivation", overflow="fold")
        for r in rows:
            table.add_row(
                r["builder"], r["client"], r["name"], _duration(r["seconds"]), _duration(r["cpu_seconds"])
            )
        console = Console()
        console.print(table if rows else "no builds running", soft_wrap=not rows)
        _report_problems(problems)
    return 1 if problems else 0


# -- usage -----------------------------------------------------------------------


def usage_rows(reports: dict[str, dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """Each client's (or builder's) sums over the builders' reports, the most build time first."""
    totals: dict[str, dict[str, float]] = {}
    for builder, report in reports.items():
        for client, counts in (report.get("clients") or {}).items():
            key = builder if by == "builder" else client_label(client)
            row = totals.setdefault(key, dict.fromkeys((c for c, _ in USAGE_COLUMNS), 0))
            for counter, _ in USAGE_COLUMNS:
                value = counts.get(counter, 0) if isinstance(counts, dict) else 0
                if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
                    row[counter] += value
    rows = [{by: key, **counts} for key, counts in totals.items()]
    return sorted(rows, key=lambda r: (-r["build_seconds"], str(r[by])))


def _reports_from_status(machines: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Each builder's all-time accounts as the dispatcher last had them."""
    from .status import read_status, status_path

    reports, problems = {}, {}
    for b in read_status(status_path(machines))["builders"]:
        if isinstance(b.get("accounts"), dict):
            reports[b["name"]] = b["accounts"]
        else:
            problems[b["name"]] = "no accounts from it yet (the dispatcher asks every minute)"
    return reports, problems


def usage_reports(
    inventory_path: str, machines: str, since: float | None
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The builders' accounts: asked with the inventory's key, or the dispatcher's all-time view."""
    inventory = load_inventory(inventory_path)
    if os.access(inventory.key_file, os.R_OK):
        command = "nixfarm accounts" + ("" if since is None else f" --since {int(since)}")
        return _split(ask_builders(inventory, command, check_report))
    if since is not None:
        raise UsageError(
            f"--since asks the builders with {inventory.key_file}, which this user cannot read: "
            "run as root (without --since: the dispatcher's all-time numbers)"
        )
    return _reports_from_status(machines)


def run_usage(inventory_path: str, machines: str, since: float | None, by: str, as_json: bool) -> int:
    """`nixfarm usage`: 0, or 1 if a builder could not be asked."""
    reports, problems = usage_reports(inventory_path, machines, since)
    rows = usage_rows(reports, by)
    if as_json:
        print(
            json.dumps(
                {"by": by, "since_seconds": since, "rows": rows, "unavailable": problems}, sort_keys=True
            )
        )
    else:
        from rich.console import Console
        from rich.table import Table

        window = "all time" if since is None else f"the last {_duration(since)} (whole hours)"
        table = Table(title=f"farm usage by {by}, {window}", box=None, header_style="bold", pad_edge=False)
        table.add_column(by, no_wrap=True, overflow="ellipsis")
        for _, header in USAGE_COLUMNS:
            table.add_column(header, no_wrap=True, justify="right")
        for r in rows:
            table.add_row(
                str(r[by]),
                *(f"{r[c]:.0f}" for c in ("builds_started", "builds_finished", "builds_failed")),
                _duration(r["build_seconds"]),
                _duration(r["cpu_seconds"]),
                _bytes(r["received_bytes"]),
                _bytes(r["sent_bytes"]),
            )
        Console().print(table if rows else "no usage recorded", soft_wrap=not rows)
        if any(r[by] == OTHERS for r in rows):
            print(f"{OTHERS}: clients whose names the builders do not show this key", file=sys.stderr)
        _report_problems(problems)
    return 1 if problems else 0


# -- formatting ------------------------------------------------------------------


def _duration(seconds: float) -> str:
    """12s, 5m03s, 3h12m, 2d04h."""
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _report_problems(problems: dict[str, str]) -> None:
    for name, why in sorted(problems.items()):
        print(f"nixfarm: {name}: {why}", file=sys.stderr)
