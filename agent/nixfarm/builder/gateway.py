"""The SSH forced command: the only thing a client key can run on a builder.

sshd runs `nixfarm gateway --client NAME --role ROLE` for every session of a
key whose authorized_keys line carries `restrict,command="..."`. The command
the client asked for is in SSH_ORIGINAL_COMMAND. We never hand it to a
shell: it must be one of a few exact argv forms, made only of plain
characters, and is then either exec'd (Nix's own protocols) or run in this
process (nixfarm's read-only commands), with every option checked here
rather than passed through.

Roles:
  metrics  `nixfarm metrics [--json|--prometheus]`, `nixfarm stream [--interval S]`
  build    metrics, plus `nix-daemon --stdio` (ssh-ng://) and
           `nix-store --serve [--write]` (ssh://)
  admin    build, plus `nixfarm gc --dry-run|--now [--json] [--target-free SIZE]`
  (every role may read `nixfarm gc --status [--json]` and `nixfarm accounts [--since DURATION]`)

A metrics-role key sees no other client's name (privacy.py) unless the
builder's configuration sets `share_client_names`. Every Nix session and
stream is recorded for the agent's per-client accounts (sessions.py).
"""

from __future__ import annotations

import os
import re
import sys
import time

from ..common.errors import RefusedError, UsageError
from ..common.names import NAME
from ..common.notify import JOURNAL_SOCKET
from .config import AgentConfig

ROLES = ("build", "metrics", "admin")
MAX_COMMAND_BYTES = 4096
# Everything a legitimate command needs; no quote, $, ;, &, |, <, >, `, *, newline...
_PLAIN = re.compile(r"[A-Za-z0-9 ._/=:,+-]*")
# Searched in order for nix-daemon and nix-store. Fixed on purpose: the session's
# PATH is whatever sshd set, and we do not want it to decide what runs.
NIX_BIN_PATH = (
    "/run/current-system/sw/bin",
    "/nix/var/nix/profiles/default/bin",
    "/usr/local/bin",
    "/usr/bin",
    "/bin",
)
STREAM_INTERVAL_RANGE = (0.2, 3600.0)


class Decision:
    """What the gateway will do: exec a Nix program, or run a nixfarm command."""

    __slots__ = ("action", "argv", "gc_action", "interval", "output_format", "since", "target_free")

    def __init__(
        self,
        action: str,
        argv: tuple[str, ...],
        output_format: str = "json",
        interval: float = 5.0,
        gc_action: str = "",
        target_free: int | None = None,
        since: float | None = None,
    ) -> None:
        self.action = action  # "exec" | "metrics" | "stream" | "gc" | "accounts"
        self.argv = argv
        self.output_format = output_format  # metrics: json | prometheus; gc: json | text
        self.interval = interval  # stream
        self.gc_action = gc_action  # gc: status | dry-run | now
        self.target_free = target_free  # gc: bytes, or None for max-free
        self.since = since  # accounts: seconds back, or None for all time

    def _key(self) -> tuple[object, ...]:
        return (
            self.action,
            self.argv,
            self.output_format,
            self.interval,
            self.gc_action,
            self.target_free,
            self.since,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Decision) and self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Decision{self._key()!r}"


_NIX_COMMANDS: dict[tuple[str, ...], str] = {
    ("nix-daemon", "--stdio"): "build",
    ("nix-store", "--serve"): "build",
    ("nix-store", "--serve", "--write"): "build",
}
_ROLE_GRANTS = {
    "metrics": {"metrics"},
    "build": {"metrics", "build"},
    "admin": {"metrics", "build", "admin"},
}


def split_command(command: str | None) -> list[str]:
    """SSH_ORIGINAL_COMMAND as argv, or RefusedError saying what is wrong with it."""
    if command is None:
        raise RefusedError("interactive login is not allowed: this key only runs Nix and nixfarm commands")
    size = len(command.encode("utf-8", "surrogateescape"))
    if size > MAX_COMMAND_BYTES:
        raise RefusedError(f"command too long ({size} bytes; at most {MAX_COMMAND_BYTES})")
    if not _PLAIN.fullmatch(command):
        bad = next(c for c in command if not _PLAIN.fullmatch(c))
        raise RefusedError(f"character {bad!r} is not allowed: commands are argv words, not shell")
    argv = command.split()
    if not argv:
        raise RefusedError("empty command")
    return argv


def decide(argv: list[str], role: str) -> Decision:
    """Map an argv to what this role may do with it, or raise RefusedError."""
    grants = _ROLE_GRANTS[role]
    needed = _NIX_COMMANDS.get(tuple(argv))
    if needed is not None:
        if needed not in grants:
            raise RefusedError(f"'{' '.join(argv)}' needs the {needed} role; this key has the {role} role")
        return Decision("exec", tuple(argv))
    if argv[0] != "nixfarm" or len(argv) < 2:
        raise RefusedError(f"command '{argv[0]}' is not allowed (allowed: {allowed_summary(role)})")
    sub, options = argv[1], argv[2:]
    if sub == "metrics":
        formats = {(): "json", ("--json",): "json", ("--prometheus",): "prometheus"}
        if tuple(options) not in formats:
            raise RefusedError(f"nixfarm metrics takes --json or --prometheus, not {' '.join(options)!r}")
        return Decision("metrics", tuple(argv), output_format=formats[tuple(options)])
    if sub == "stream":
        return Decision("stream", tuple(argv), interval=_stream_interval(options))
    if sub == "gc":
        return _gc_decision(argv, options, grants, role)
    if sub == "accounts":
        return Decision("accounts", tuple(argv), since=_accounts_since(options))
    raise RefusedError(f"nixfarm {sub} is not allowed (allowed: {allowed_summary(role)})")


def _stream_interval(options: list[str]) -> float:
    if not options:
        return 5.0
    low, high = STREAM_INTERVAL_RANGE
    if len(options) == 2 and options[0] == "--interval":
        try:
            value = float(options[1])
        except ValueError:
            value = -1.0
        if low <= value <= high:
            return value
    raise RefusedError(f"nixfarm stream takes only --interval SECONDS ({low} to {high})")


def _accounts_since(options: list[str]) -> float | None:
    """`nixfarm accounts [--json] [--since DURATION]`: always JSON on the wire."""
    from .config import parse_duration

    rest = [o for o in options if o != "--json"]
    if not rest:
        return None
    if len(rest) == 2 and rest[0] == "--since":
        try:
            return parse_duration(rest[1])
        except ValueError as e:
            raise RefusedError(f"nixfarm accounts --since: {e}") from None
    raise RefusedError("nixfarm accounts takes only --json and --since DURATION (e.g. 12h, 7d)")


def _gc_decision(argv: list[str], options: list[str], grants: set[str], role: str) -> Decision:
    """`nixfarm gc --status|--dry-run|--now [--json] [--target-free SIZE]`; status is read-only."""
    from ..common.nixconf import parse_size

    usage = "nixfarm gc takes one of --status, --dry-run, --now, and optionally --json, --target-free SIZE"
    actions = [o for o in options if o in ("--status", "--dry-run", "--now")]
    rest = [o for o in options if o not in actions and o != "--json"]
    target = None
    if len(rest) == 2 and rest[0] == "--target-free":
        try:
            target = parse_size(rest[1])
        except UsageError:
            raise RefusedError(f"--target-free {rest[1]!r} is not a size (e.g. 32M)") from None
        rest = []
    if len(actions) != 1 or rest or options.count("--json") > 1:
        raise RefusedError(usage)
    action = actions[0].removeprefix("--")
    if action != "status" and "admin" not in grants:
        raise RefusedError(f"'nixfarm gc --{action}' needs the admin role; this key has the {role} role")
    fmt = "json" if "--json" in options else "text"
    return Decision("gc", tuple(argv), output_format=fmt, gc_action=action, target_free=target)


def allowed_summary(role: str) -> str:
    """The commands a role may run, for refusal messages."""
    grants = _ROLE_GRANTS[role]
    allowed = ["nixfarm metrics", "nixfarm stream", "nixfarm gc --status", "nixfarm accounts"]
    if "build" in grants:
        allowed += [" ".join(c) for c in _NIX_COMMANDS]
    if "admin" in grants:
        allowed += ["nixfarm gc --dry-run", "nixfarm gc --now"]
    return ", ".join(allowed)


def check_session(environ: dict[str, str]) -> None:
    """Refuse sessions sshd should never have given this key (defence in depth).

    `restrict` in authorized_keys already forbids these; if we see them anyway
    the builder's sshd is misconfigured and we would rather stop.
    """
    if environ.get("SSH_AUTH_SOCK"):
        raise RefusedError("agent forwarding is not allowed for this key")
    if environ.get("SSH_TTY") or os.isatty(0):
        raise RefusedError("a terminal was requested: this key only runs Nix and nixfarm commands")
    if environ.get("DISPLAY"):
        raise RefusedError("X11 forwarding is not allowed for this key")


def resolve_program(name: str, config: AgentConfig) -> str:
    """Absolute path of nix-daemon or nix-store, from config or the fixed path."""
    dirs = (config.nix_bin_dir,) if config.nix_bin_dir else NIX_BIN_PATH
    for d in dirs:
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    raise RefusedError(f"{name} not found on this builder (looked in {', '.join(dirs)})")


def validate_invocation(client: str, role: str) -> None:
    """Check the forced command's own arguments (written by the admin, not the client)."""
    if not NAME.fullmatch(client):
        raise UsageError(f"--client {client!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    if role not in ROLES:
        raise UsageError(f"--role {role!r}: must be one of {', '.join(ROLES)}")


def record(config: AgentConfig, refused: bool, message: str, **fields: str) -> None:
    """Log one decision: to the journal where there is one, else to the configured file.

    Without either, the refusal line on stderr is the only record (stderr reaches
    the client, which must never see accepted commands). This runs on every
    session before nix-daemon starts, so it avoids the logging module and
    systemd.journal (~15 ms of imports) and sends through systemd-python's
    C extension directly.
    """
    if os.path.exists(JOURNAL_SOCKET):
        try:
            from systemd._journal import sendv  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            pass
        else:
            extra = [f"NIXFARM_{k.upper()}={v}" for k, v in fields.items()]
            sendv(
                f"MESSAGE={message}",
                f"PRIORITY={4 if refused else 6}",
                "SYSLOG_IDENTIFIER=nixfarm-gateway",
                *extra,
            )
            return
    if config.gateway_log:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} nixfarm-gateway[{os.getpid()}]: {message}\n"
        try:
            fd = os.open(config.gateway_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError:
            return
        try:
            os.write(fd, line.encode("utf-8", "backslashreplace"))
        finally:
            os.close(fd)


def _describe(command: str | None) -> str:
    if command is None:
        return "(login)"
    shown = command[:200] + ("..." if len(command) > 200 else "")
    return repr(shown)


def run(client: str, role: str, config: AgentConfig) -> int:
    """Decide on SSH_ORIGINAL_COMMAND and carry it out; returns an exit code."""
    validate_invocation(client, role)
    command = os.environ.get("SSH_ORIGINAL_COMMAND")
    peer = os.environ.get("SSH_CONNECTION", "").split(" ")[0] or "local"
    try:
        check_session(dict(os.environ))
        decision = decide(split_command(command), role)
        if decision.action == "exec":
            program = resolve_program(decision.argv[0], config)
    except RefusedError as e:
        record(
            config,
            True,
            f"refused client={client} role={role} from={peer} command={_describe(command)}: {e}",
            client=client,
            role=role,
            decision="refused",
            peer=peer,
        )
        print(f"nixfarm gateway: refused: {e}", file=sys.stderr)
        return 1
    record(
        config,
        False,
        f"allowed client={client} role={role} from={peer} command={_describe(command)}",
        client=client,
        role=role,
        decision="allowed",
        peer=peer,
    )
    if decision.action in ("exec", "stream"):
        from .sessions import record_session

        record_session(config.state_dir, client)
    if decision.action == "exec":
        env = {k: v for k, v in os.environ.items() if k != "SSH_ORIGINAL_COMMAND"}
        env["NIXFARM_CLIENT"] = client
        os.execve(program, list(decision.argv), env)  # noqa: S606 - never a shell, by design
    from . import commands  # the read-only commands, run in this process

    # Whose names this key sees: its own only, for a metrics key on a builder that does not share them.
    viewer = client if role == "metrics" and not config.share_client_names else None
    if decision.action == "metrics":
        return commands.print_metrics(config, decision.output_format, viewer)
    if decision.action == "gc":
        return commands.run_gc(
            config, decision.gc_action, decision.output_format == "json", decision.target_free
        )
    if decision.action == "accounts":
        return commands.print_accounts(config, decision.since, viewer)
    # Only a key that may build says how many builds its client has waiting (demand.py).
    return commands.run_stream(
        config, decision.interval, client=client if role in ("build", "admin") else None, viewer=viewer
    )
