"""The `nixfarm` command line.

Exit codes (README "Exit codes"): 0 success; 1 refused or failed; 2 bad
command line or configuration; 3 the machine lacks something (no Nix store);
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import stat
import sys
import time

from . import version
from .config import AgentConfig, load_config
from .errors import NixfarmError, UsageError

# The gateway's path to nix-daemon runs through here on every SSH session:
# keep module-level imports cheap (typing alone costs ~3 ms). mypy treats any
# name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

    from .demand import ClientDemand

RELAY_RETRY = 30.0  # seconds between a stream's tries to hand itself over to the agent


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, not a usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _VersionAction(argparse.Action):
    """--version, looking the version up only when asked (see nixfarm.version)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **_: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"nixfarm {version()}")
        parser.exit()


def _size(text: str) -> int:
    from .nixconf import parse_size

    try:
        return parse_size(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.05 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text} is out of range (0.05 to 86400 seconds)")
    return value


def _duration(text: str) -> float:
    from .config import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """The parser for every subcommand."""
    parser = _Parser(
        prog="nixfarm",
        description="Agent and dispatcher of a self-hosted Nix build farm.",
        epilog="Exit codes: 0 ok, 1 refused or failed, 2 bad usage or config, "
        "3 machine lacks something (e.g. no Nix store), 130 interrupted.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="agent config (JSON); default $NIXFARM_CONFIG or /etc/nixfarm/agent.json if present",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "metrics",
        help="print one snapshot of this builder",
        allow_abbrev=False,
        description="Print one metrics snapshot of this builder (README: 'The metrics snapshot').",
    )
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="format", action="store_const", const="json", help="JSON (the default)")
    fmt.add_argument(
        "--prometheus",
        dest="format",
        action="store_const",
        const="prometheus",
        help="Prometheus text exposition format",
    )
    p.set_defaults(format="json")

    p = sub.add_parser(
        "stream",
        help="print a snapshot per line until stdin closes",
        allow_abbrev=False,
        description="Print one JSON snapshot per line every INTERVAL seconds, until stdin "
        "(a pipe or socket, as in an SSH session) closes or the reader goes away; "
        "then exit 0.",
    )
    p.add_argument("--interval", type=_interval, default=5.0, metavar="SECONDS", help="default 5")
    p.add_argument("--count", type=int, metavar="N", help="stop after N snapshots")

    p = sub.add_parser(
        "gateway",
        help="SSH forced command for client keys (see README)",
        allow_abbrev=False,
        description="Run the command in SSH_ORIGINAL_COMMAND if ROLE allows it; refuse "
        "anything else. Used in authorized_keys as "
        'restrict,command="nixfarm gateway --client NAME --role ROLE".',
    )
    p.add_argument("--client", required=True, help="the client this key belongs to (for logs)")
    p.add_argument("--role", required=True, help="build, metrics or admin")

    p = sub.add_parser(
        "dispatch",
        help="the client service: keep Nix's machines file true to the builders' load",
        allow_abbrev=False,
        description="Follow every builder of the inventory over SSH (nixfarm stream through the gateway) "
        "and keep MACHINES, the file Nix's build hook reads (nix.conf: builders = @MACHINES), listing "
        "the usable builders, and hold in Nix's slot locks (--current-load) what this client must leave "
        "to others, from the builders' real load. On exit it puts the inventory's static lines back. "
        "See README 'The dispatcher'.",
    )
    p.add_argument("--inventory", required=True, metavar="FILE", help="the farm inventory (JSON)")
    p.add_argument("--machines", required=True, metavar="PATH", help="the machines file to keep")
    p.add_argument("--interval", type=_interval, default=2.0, metavar="S", help="stream interval (default 2)")
    p.add_argument(
        "--keepalive",
        type=_interval,
        default=5.0,
        metavar="S",
        help="SSH keepalive interval; 3 missed answers drop a builder (default 5)",
    )
    p.add_argument(
        "--backoff-base",
        type=_interval,
        default=60.0,
        metavar="S",
        help="first retry delay after a failure; then x3 each time (default 60)",
    )
    p.add_argument(
        "--backoff-max",
        type=_interval,
        default=1800.0,
        metavar="S",
        help="longest retry delay (default 1800)",
    )
    p.add_argument(
        "--build-poll-interval",
        type=_interval,
        default=1.0,
        metavar="S",
        help="the client Nix's build-poll-interval (default 1, as the client module sets it): with "
        "--interval, how far ahead the dispatcher looks for slots about to free up",
    )
    p.add_argument(
        "--lock-names",
        choices=("both", "nix", "lix"),
        default=os.environ.get("NIXFARM_LOCK_NAMES", "both"),
        help="whose slot lock file names to hold: Nix's (CppNix 2.x), Lix's, or both (the default, "
        "or $NIXFARM_LOCK_NAMES, which the client module sets to its Nix's)",
    )
    p.add_argument(
        "--current-load",
        default="/nix/var/nix/current-load",
        metavar="DIR",
        help="where Nix's build hook counts each builder's load (the store's state directory "
        "+ /current-load; default /nix/var/nix/current-load): the dispatcher holds back the slots "
        "this client must leave to others there",
    )

    p = sub.add_parser(
        "status",
        help="the builders as the dispatcher sees them",
        allow_abbrev=False,
        description="Show each builder's state, reason, jobs, this client's builds there (mine), "
        "the slots held back for other clients, "
        "the builds it may take ahead, load, pressure, free disk, GC state, when it was last seen and "
        "the line Nix currently sees for it.",
    )
    p.add_argument(
        "--machines",
        default=None,
        metavar="PATH",
        help="the dispatcher's machines file (default /var/lib/nixfarm-client/machines)",
    )
    p.add_argument("--json", action="store_true", help="the dispatcher's full status as JSON")
    p.add_argument("--watch", action="store_true", help="redraw every second until Ctrl-C")

    p = sub.add_parser(
        "doctor",
        help="check every builder the way nix-daemon will reach it; print the fixes",
        allow_abbrev=False,
        description="Run as root on a client: for each builder of the inventory check name resolution, "
        "TCP, the host key, the client key file, the gateway roles, an ssh-ng handshake with its Nix "
        "daemon and its trust in this client against the farm's trust mode, this client's Nix signing key "
        "and unsigned store paths (untrusted mode), systems/features and clock skew. Exit 1 if any "
        "builder is unusable.",
    )
    p.add_argument(
        "--inventory",
        default="/etc/nixfarm/inventory.json",
        metavar="FILE",
        help="the farm inventory (default /etc/nixfarm/inventory.json)",
    )
    p.add_argument("--json", action="store_true", help="a JSON list of builders and their checks")

    p = sub.add_parser(
        "sign-store",
        help="sign every path of the local store with this client's Nix signing key",
        allow_abbrev=False,
        description="Run as root on a client: sign every valid path of the local Nix store with the "
        "inventory's client.signing_key_file (nix store sign --all), so that builders that do not trust "
        'their clients (services.nixfarm.farm.trust = "untrusted") accept them as build inputs. Nix '
        "signs what it builds once secret-key-files is set; this is for what the store held before. "
        "Prints how many paths got a signature.",
    )
    p.add_argument(
        "--inventory",
        default="/etc/nixfarm/inventory.json",
        metavar="FILE",
        help="the farm inventory (default /etc/nixfarm/inventory.json)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "gc",
        help="store GC: --status, --dry-run, --now",
        allow_abbrev=False,
        description="Store garbage collection. The agent keeps free space between min-free and max-free "
        "by itself; this shows what it did and would do, or asks it for a pass now. --now and --dry-run "
        "talk to the running agent over its control socket (as root, or as a member of its control_group).",
    )
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument(
        "--status",
        dest="action",
        action="store_const",
        const="status",
        help="the last passes: when, why, what they freed",
    )
    action.add_argument(
        "--dry-run",
        dest="action",
        action="store_const",
        const="dry-run",
        help="what a pass would delete now, in order, with sizes and reasons",
    )
    action.add_argument(
        "--now",
        dest="action",
        action="store_const",
        const="now",
        help="run one pass now, up to max-free (or --target-free)",
    )
    p.add_argument(
        "--target-free",
        type=_size,
        metavar="SIZE",
        help="free space to reach instead of max-free (bytes or 16M, 10G)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "accounts",
        help="this builder's per-client accounts (JSON)",
        allow_abbrev=False,
        description="Print this builder's accounts per client as JSON: builds started, finished and "
        "failed, build and CPU seconds, bytes received and sent (README 'Accounts'). Over SSH a "
        "metrics-role key sees other clients only as '(others)'.",
    )
    p.add_argument(
        "--since", type=_duration, metavar="DURATION", help="only the last 90m, 12h, 7d ... (to the hour)"
    )
    p.add_argument("--json", action="store_true", help="JSON (always; accepted for symmetry)")

    p = sub.add_parser(
        "builds",
        help="every build running on the farm",
        allow_abbrev=False,
        description="List the builds running on every builder: builder, client, derivation, how long "
        "it has run, CPU time. By default from the dispatcher's status (any user of a client); with "
        "--inventory, asked of each builder over SSH with that inventory's key.",
    )
    p.add_argument("--machines", default=None, metavar="PATH", help="the dispatcher's machines file")
    p.add_argument("--inventory", default=None, metavar="FILE", help="ask the builders of this inventory")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "usage",
        help="the farm's totals per client or builder",
        allow_abbrev=False,
        description="Ask every builder of the inventory for its accounts and add them up: builds "
        "started, finished, failed, build time, CPU time, bytes received and sent, with the "
        "inventory's key (root on a client, or an admin's own inventory). A user who cannot read "
        "the key gets the all-time numbers the dispatcher keeps (--machines). Exit 1 if a builder "
        "did not answer (the others are still shown).",
    )
    p.add_argument(
        "--inventory",
        default="/etc/nixfarm/inventory.json",
        metavar="FILE",
        help="the farm inventory (default /etc/nixfarm/inventory.json)",
    )
    p.add_argument(
        "--since", type=_duration, metavar="DURATION", help="only the last 90m, 12h, 7d ... (to the hour)"
    )
    p.add_argument(
        "--by", choices=("client", "builder"), default="client", help="rows per client (default) or builder"
    )
    p.add_argument(
        "--machines", default=None, metavar="PATH", help="the dispatcher's machines file (its status)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "ssh-masters",
        help="keep one shared SSH connection to every builder open (connection sharing)",
        allow_abbrev=False,
        description="Run as root on a client whose ssh_config shares connections (the client module's "
        "connectionSharing): check every 2 s that each HOST has a master connection, and open one "
        "(ssh -N -f, ControlPersist yes) where there is none, so that builds starting at once never race "
        "to become the master (README 'Connection sharing'). Runs until stopped.",
    )
    p.add_argument("hosts", nargs="+", metavar="HOST", help="the builders, by the names Nix's ssh uses")
    p.add_argument("--ssh", default="ssh", metavar="PROGRAM", help="the ssh to run (default: ssh from PATH)")

    p = sub.add_parser(
        "agent",
        help="the builder service (sd_notify, watchdog)",
        allow_abbrev=False,
        description="Run the builder agent: readiness and watchdog for systemd, a status line, "
        "store GC between min-free and max-free, a record of the builds that ended, for streams, "
        "per-client accounts, and Prometheus metrics over HTTP where prometheus_listen is set.",
    )
    p.add_argument(
        "--interval",
        type=_interval,
        default=10.0,
        metavar="SECONDS",
        help="seconds between checks (default 10)",
    )
    return parser


def _report_warnings(warnings: list[str]) -> None:
    for w in warnings:
        print(f"nixfarm: warning: {w}", file=sys.stderr)


def print_metrics(config: AgentConfig, output_format: str, viewer: str | None = None) -> int:
    """`nixfarm metrics`: one snapshot on stdout (with only `viewer`'s client name, if given)."""
    from .metrics import Collector
    from .privacy import snapshot_for

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

    from . import demand
    from .metrics import Collector
    from .privacy import snapshot_for

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
    """`nixfarm accounts`: this builder's per-client accounts as JSON (README "Accounts")."""
    from . import control
    from .accounts import report
    from .privacy import report_for

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


def _dispatch(args: argparse.Namespace) -> int:
    from .dispatch import Settings, run_dispatch
    from .inventory import load_inventory
    from .slots import SlotHolds, raise_open_file_limit
    from .status import status_path

    inventory = load_inventory(args.inventory)
    settings = Settings(
        interval=args.interval,
        keepalive=args.keepalive,
        backoff_base=args.backoff_base,
        backoff_max=args.backoff_max,
        build_poll_interval=args.build_poll_interval,
    )
    machines_dir = os.path.dirname(os.path.abspath(args.machines))
    if not os.access(machines_dir, os.W_OK):
        raise UsageError(f"--machines {args.machines}: cannot write in {machines_dir}")
    try:
        os.makedirs(args.current_load, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--current-load {args.current_load}: {(e.strerror or str(e)).lower()}") from None
    if not os.access(args.current_load, os.W_OK):
        raise UsageError(
            f"--current-load {args.current_load}: cannot write there; run the dispatcher as the "
            "user Nix builds as (root with nix-daemon)"
        )
    raise_open_file_limit()
    holds = SlotHolds(args.current_load, args.lock_names)
    return run_dispatch(inventory, args.machines, settings, status_path(args.machines), holds)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand, turning expected failures into exit codes."""
    try:
        args = build_parser().parse_args(argv)
        if args.command == "dispatch":
            return _dispatch(args)
        if args.command == "status":
            from .status import DEFAULT_MACHINES, run_status

            return run_status(args.machines or DEFAULT_MACHINES, args.json, args.watch)
        if args.command == "doctor":
            from .doctor import run_doctor

            return run_doctor(args.inventory, args.json)
        if args.command == "sign-store":
            from .signing import run_sign_store

            return run_sign_store(args.inventory, args.json)
        if args.command == "builds":
            from .farmview import run_builds
            from .status import DEFAULT_MACHINES

            return run_builds(args.machines or DEFAULT_MACHINES, args.inventory, args.json)
        if args.command == "usage":
            from .farmview import run_usage
            from .status import DEFAULT_MACHINES

            return run_usage(
                args.inventory, args.machines or DEFAULT_MACHINES, args.since, args.by, args.json
            )
        if args.command == "ssh-masters":
            from . import logs
            from .masters import run_masters

            logs.setup("nixfarm.masters", "nixfarm-ssh-masters")
            return run_masters([args.ssh], args.hosts)
        config = load_config(args.config)
        if args.command == "accounts":
            return print_accounts(config, args.since)
        if args.command == "metrics":
            return print_metrics(config, args.format)
        if args.command == "stream":
            return run_stream(config, args.interval, args.count)
        if args.command == "gateway":
            from . import gateway

            return gateway.run(args.client, args.role, config)
        if args.command == "agent":
            from .agent import run_agent

            return run_agent(config, args.interval)
        if args.command == "gc":
            return run_gc(config, args.action, args.json, args.target_free)
        raise UsageError(f"unknown command {args.command}")
    except NixfarmError as e:
        print(f"nixfarm: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
