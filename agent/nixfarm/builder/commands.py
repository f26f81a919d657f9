"""The builder's commands: `metrics`, `stream`, `accounts` and `gc`.

The gateway runs them in its own process for a client key (gateway.py), and
`nixfarm` for a local user (cli.py). The gateway's path to nix-daemon runs
through the gateway module, not this one, so imports here only cost the
commands that use them.
"""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import sys
import time

from ..common.errors import NixfarmError

# mypy treats any name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .config import AgentConfig
    from .demand import ClientDemand

RELAY_RETRY = 30.0  # seconds between a stream's tries to hand itself over to the agent


def _report_warnings(warnings: list[str]) -> None:
    for w in warnings:
        print(f"nixfarm: warning: {w}", file=sys.stderr)


def print_metrics(config: AgentConfig, output_format: str, viewer: str | None = None) -> int:
    """`nixfarm metrics`: one snapshot on stdout (with only `viewer`'s client name, if given)."""
    from ..common.privacy import snapshot_for
    from .metrics import Collector

    collector = Collector(config)
    try:
        snap = collector.snapshot()
    finally:
        collector.close()
    if viewer is not None:
        snap = snapshot_for(snap, viewer)
    if output_format == "prometheus":
        from .prometheus import render

        sys.stdout.write(render(snap))
    else:
        indent = 2 if sys.stdout.isatty() else None
        sys.stdout.write(json.dumps(snap, indent=indent, sort_keys=True) + "\n")
    sys.stdout.flush()
    _report_warnings(collector.take_warnings())
    return 0


def _stdin_is_a_session() -> bool:
    """True if stdin is a pipe or socket, whose end means the session closed.

    /dev/null or a file is at its end at once and says nothing about the reader.
    """
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class _Input:
    """The stream's stdin: its end ends the stream; its lines may carry the client's demand
    (demand.Lines)."""

    def __init__(self, watch: bool) -> None:
        from . import demand  # not at the top: the gateway's path to nix-daemon stays short

        self.watch = watch
        self._lines = demand.Lines()

    def wait(self, timeout: float, on_demand: Callable[[int], None]) -> bool:
        """Read stdin for up to `timeout` s; True once a watched stdin reaches its end."""
        deadline = time.monotonic() + timeout
        if not self.watch:
            time.sleep(timeout)
            return False
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([0], [], [], left)
            if not ready:
                return False
            try:
                data = os.read(0, 4096)
            except OSError:
                return True
            if not data:
                return True
            for count in self._lines.feed(data):
                on_demand(count)
        return False


def run_stream(
    config: AgentConfig,
    interval: float,
    count: int | None = None,
    client: str | None = None,
    viewer: str | None = None,
) -> int:
    """`nixfarm stream`: a JSON line per interval until stdin closes or stdout breaks.

    With `client` (the gateway names it, for the build and admin roles), a
    `demand N` line on stdin is kept as that client's builds waiting for a
    machine (demand.py); other input is ignored. With `viewer`, other clients'
    names are hidden (privacy.py).

    In an SSH session the agent service serves the stream from its own
    snapshots (relay.py); where none answers, this process takes its own,
    and hands over as soon as one does.
    """
    from . import relay

    # A session may also end with SIGHUP: that means "done", quietly. (SIGPIPE
    # stays ignored, as Python sets it, so a gone reader is a BrokenPipeError.)
    signal.signal(signal.SIGHUP, lambda *_: os._exit(0))
    session = _stdin_is_a_session()
    cat = relay.waiter() if session else None
    deadline = time.monotonic() + config.stream_max_seconds

    retry_at = 0.0

    def try_hand_over(sent: int) -> None:
        """If the agent takes the session, wait for it in `cat` (never returns)."""
        nonlocal retry_at
        now = time.monotonic()
        if not cat or now < retry_at or now >= deadline:
            return
        if not os.path.exists(relay.socket_path(config.state_dir)):
            return  # no agent serves streams here (a stat per interval to notice one)
        left = None if count is None else count - sent
        waiting = kept.waiting if kept else None
        conn = relay.hand_over(config.state_dir, interval, client, left, deadline - now, waiting, viewer)
        if conn is None:
            retry_at = now + RELAY_RETRY  # it refused (or did not answer): not at every interval
            return
        if kept:
            kept.remove()  # the agent keeps this client's demand now
        relay.wait_for_agent(conn, cat)

    kept: ClientDemand | None = None
    try_hand_over(0)

    from ..common.privacy import snapshot_for
    from . import demand
    from .metrics import Collector

    stdin = _Input(session)
    collector = Collector(config)
    kept = demand.ClientDemand(config.state_dir, client) if client else None
    sent = 0
    try:
        while True:
            if kept:
                kept.refresh()
                if kept.problem:
                    collector.warnings.append(kept.problem)
            snap = collector.snapshot()
            if viewer is not None:
                snap = snapshot_for(snap, viewer)
            line = json.dumps(snap, sort_keys=True).encode() + b"\n"
            try:
                os.write(1, line)  # unbuffered: a reader sees each line at once
            except BrokenPipeError:
                return 0
            _report_warnings(collector.take_warnings())
            sent += 1
            if count is not None and sent >= count:
                return 0
            if time.monotonic() >= deadline or stdin.wait(interval, kept.set if kept else lambda _: None):
                return 0
            try_hand_over(sent)
    finally:
        if kept:
            kept.remove()
        collector.close()


def print_accounts(config: AgentConfig, since: float | None, viewer: str | None = None) -> int:
    """`nixfarm accounts`: this builder's per-client accounts as JSON (docs/metrics.md, "Accounts")."""
    from ..common.privacy import report_for
    from . import control
    from .accounts import report

    start = None if since is None else time.time() - since
    try:  # the agent's live numbers; its record, a few seconds old, where it does not answer
        answer = control.request(
            control.socket_path(config.state_dir), {"command": "accounts", "since": start}, lambda _: None, 10
        )
        data = answer["result"] if answer.get("event") == "done" else report(config.state_dir, start)
    except (control.AgentUnavailable, OSError, ValueError):
        data = report(config.state_dir, start)
    if viewer is not None:
        data = report_for(data, viewer)
    print(json.dumps(data, sort_keys=True))
    return 0


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"


def run_gc(config: AgentConfig, action: str, as_json: bool, target_free: int | None) -> int:
    """`nixfarm gc`: --status from the state files; --now and --dry-run through the agent."""
    from . import control
    from .gc import read_history

    if action == "status":
        from .metrics import read_gc_state

        state = read_gc_state(config.state_dir)
        history = read_history(os.path.join(config.state_dir, "gc-history.jsonl"))[-10:]
        if as_json:
            print(json.dumps({"state": state, "history": history}, sort_keys=True))
        else:
            print(f"GC running: {'yes' if state['running'] else 'no'}")
            if not history:
                print("no GC pass has run yet")
            for run in history:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.get("last_run") or 0))
                outcome = (
                    f"error: {run['error']}"
                    if run.get("error")
                    else (f"deleted {run.get('deleted')} paths, freed {_mib(run.get('bytes_freed'))}")
                )
                print(
                    f"{when}  {run.get('reason', '?'):14} {outcome}, "
                    f"free {_mib(run.get('free_before'))} -> {_mib(run.get('free_after'))} "
                    f"in {run.get('duration_seconds')} s"
                )
        return 0

    def show(event: dict[str, Any]) -> None:
        if event.get("event") == "progress" and not as_json:
            freed, free = _mib(event["bytes_freed"]), _mib(event["free_bytes"])
            print(f"deleted {event['deleted']} paths, freed {freed} ({free} free)", file=sys.stderr)

    request = {"command": "gc-now" if action == "now" else "dry-run", "target_free": target_free}
    final = control.request(control.socket_path(config.state_dir), request, show)
    if as_json:
        print(json.dumps(final, sort_keys=True))
    elif final["event"] == "busy":
        print("a GC pass is already running; not starting another (see nixfarm gc --status)")
    elif final["event"] == "error":
        raise NixfarmError(f"the agent refused: {final.get('message')}")
    elif action == "now":
        r = final["result"]
        if r["error"]:
            raise NixfarmError(f"GC pass failed: {r['error']}")
        before, after = _mib(r["free_before"]), _mib(r["free_after"])
        print(
            f"deleted {r['deleted']} paths, freed {_mib(r['bytes_freed'])} "
            f"in {r['duration_seconds']} s; free {before} -> {after}"
        )
    else:
        _print_plan(final["result"])
    return 1 if final["event"] == "error" else 0


def _print_plan(result: dict[str, Any]) -> None:
    plan = result["plan"]
    total = sum(p["size_bytes"] for p in plan)
    print(
        f"{result['dead_paths']} dead paths ({_mib(result['dead_bytes'])}); "
        f"free {_mib(result['free_bytes'])}, target {_mib(result['target_free_bytes'])}"
    )
    if not plan:
        print("nothing would be deleted")
        return
    print(f"would delete {len(plan)} paths ({_mib(total)}), in this order:")
    for i, p in enumerate(plan, 1):
        print(f"{i:5}. {p['path']}  {_mib(p['size_bytes'])}  {p['reason']}")
