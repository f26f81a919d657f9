"""The `nixfarm` command line.

Exit codes (docs/commands.md, "Exit codes"): 0 success; 1 refused or failed; 2 bad
command line or configuration; 3 the machine lacks something (no Nix store);
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import version
from .builder.config import load_config
from .common.errors import NixfarmError, UsageError

# The gateway's path to nix-daemon runs through here on every SSH session:
# keep module-level imports cheap (typing alone costs ~3 ms). mypy treats any
# name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn


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
    from .common.nixconf import parse_size

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
    from .builder.config import parse_duration

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
        help="SSH keepalive interval once a stream is silent; 3 missed answers: down (default 5)",
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


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand, turning expected failures into exit codes."""
    try:
        args = build_parser().parse_args(argv)
        if args.command == "dispatch":
            from .client import commands

            return commands.run(args)
        if args.command == "status":
            from .client.status import DEFAULT_MACHINES, run_status

            return run_status(args.machines or DEFAULT_MACHINES, args.json, args.watch)
        if args.command == "doctor":
            from .client.doctor import run_doctor

            return run_doctor(args.inventory, args.json)
        if args.command == "sign-store":
            from .client.signing import run_sign_store

            return run_sign_store(args.inventory, args.json)
        if args.command == "builds":
            from .client.farmview import run_builds
            from .client.status import DEFAULT_MACHINES

            return run_builds(args.machines or DEFAULT_MACHINES, args.inventory, args.json)
        if args.command == "usage":
            from .client.farmview import run_usage
            from .client.status import DEFAULT_MACHINES

            return run_usage(
                args.inventory, args.machines or DEFAULT_MACHINES, args.since, args.by, args.json
            )
        if args.command == "ssh-masters":
            from .client.masters import run_masters
            from .common import logs

            logs.setup("nixfarm.masters", "nixfarm-ssh-masters")
            return run_masters([args.ssh], args.hosts)
        config = load_config(args.config)
        from .builder import commands as builder

        if args.command == "accounts":
            return builder.print_accounts(config, args.since)
        if args.command == "metrics":
            return builder.print_metrics(config, args.format)
        if args.command == "stream":
            return builder.run_stream(config, args.interval, args.count)
        if args.command == "gateway":
            from .builder import gateway

            return gateway.run(args.client, args.role, config)
        if args.command == "agent":
            from .builder.agent import run_agent

            return run_agent(config, args.interval)
        if args.command == "gc":
            return builder.run_gc(config, args.action, args.json, args.target_free)
        raise UsageError(f"unknown command {args.command}")
    except NixfarmError as e:
        print(f"nixfarm: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
