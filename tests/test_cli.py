"""The `nixfarm` command as a user runs it: bad input gives one line and a documented exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

NIXFARM = str(Path(sys.executable).parent / "nixfarm")


def nixfarm(
    *args: str,
    env: dict[str, str] | None = None,
    config: dict[str, object] | None = None,
    tmp_path: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("NIXFARM_", "SSH_"))}
    if config is not None and tmp_path is not None:
        path = tmp_path / "agent.json"
        path.write_text(json.dumps(config))
        full_env["NIXFARM_CONFIG"] = str(path)
    full_env.update(env or {})
    return subprocess.run(
        [NIXFARM, *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert text in result.stderr


def test_missing_store_exits_3_with_one_line(tmp_path: Path) -> None:
    result = nixfarm("metrics", config={"store_dir": str(tmp_path / "nix/store")}, tmp_path=tmp_path)
    assert_one_line(result, 3, f"Nix store {tmp_path}/nix/store does not exist")
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["metrics", "--bogus"],
        ["--bogus"],
        ["stream", "--interval", "x"],
        ["stream", "--interval", "0"],
        ["frobnicate"],
        [],
    ],
)
def test_bad_command_line_exits_2_with_one_line(args: list[str]) -> None:
    assert_one_line(nixfarm(*args), 2, "nixfarm: error: ")


def test_metrics_json_and_prometheus_are_mutually_exclusive() -> None:
    assert_one_line(nixfarm("metrics", "--json", "--prometheus"), 2, "not allowed with argument")


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    result = nixfarm("metrics", config={"store_dri": "/nix/store"}, tmp_path=tmp_path)
    assert_one_line(result, 2, "unknown key 'store_dri'")


def test_help_explains_commands_and_exit_codes() -> None:
    result = nixfarm("--help")
    assert result.returncode == 0
    for word in ("metrics", "stream", "gateway", "agent", "Exit codes"):
        assert word in result.stdout
    gateway_help = nixfarm("gateway", "--help").stdout
    assert 'restrict,command="nixfarm gateway --client NAME --role ROLE"' in gateway_help.replace("\n", " ")


def test_stream_count_prints_that_many_json_lines(tmp_path: Path) -> None:
    result = nixfarm(
        "stream",
        "--interval",
        "0.05",
        "--count",
        "3",
        config={"store_dir": str(tmp_path)},
        tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert all(json.loads(line)["store"]["path"] == str(tmp_path) for line in lines)


def start_stream(tmp_path: Path) -> subprocess.Popen[bytes]:
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"store_dir": str(tmp_path)}))
    return subprocess.Popen(
        [NIXFARM, "--config", str(config), "stream", "--interval", "0.05"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_stream_ends_quietly_when_its_stdin_pipe_closes(tmp_path: Path) -> None:
    stream = start_stream(tmp_path)
    assert stream.stdin is not None and stream.stdout is not None
    assert json.loads(stream.stdout.readline())["schema"] == 1
    stream.stdin.close()  # what sshd does when the session ends
    assert stream.wait(timeout=10) == 0
    assert stream.stderr is not None
    assert b"Traceback" not in stream.stderr.read()


def test_stream_ends_quietly_when_the_reader_goes_away(tmp_path: Path) -> None:
    stream = start_stream(tmp_path)
    assert stream.stdout is not None and stream.stderr is not None
    stream.stdout.readline()
    stream.stdout.close()  # the reader is gone: the next write breaks the pipe
    assert stream.wait(timeout=10) == 0
    assert b"Traceback" not in stream.stderr.read()


@pytest.mark.parametrize(
    ("client", "role", "message"),
    [
        ("alice", "root", "--role 'root': must be one of build, metrics, admin"),
        ("al ice", "build", "--client 'al ice'"),
    ],
)
def test_gateway_misconfiguration_exits_2(client: str, role: str, message: str) -> None:
    result = nixfarm(
        "gateway",
        "--client",
        client,
        "--role",
        role,
        env={"SSH_ORIGINAL_COMMAND": "nixfarm metrics"},
    )
    assert_one_line(result, 2, message)


def test_gateway_refuses_a_long_command_in_one_line(tmp_path: Path) -> None:
    # 100 KiB: an environment string cannot exceed 128 KiB (the 1 MiB case is in
    # test_gateway_remote.py, where sshd itself drops it).
    junk = "nix-daemon --stdio; " + "A" * (100 << 10)
    result = nixfarm(
        "gateway",
        "--client",
        "alice",
        "--role",
        "build",
        env={"SSH_ORIGINAL_COMMAND": junk},
        config={},
        tmp_path=tmp_path,
    )
    assert_one_line(
        result, 1, f"nixfarm gateway: refused: command too long ({len(junk)} bytes; at most 4096)"
    )
    assert result.stdout == ""


def test_gc_works_locally_status_and_a_clear_line_without_an_agent(tmp_path: Path) -> None:
    """The gc command as a root user on the builder runs it (not only through the gateway)."""
    config = {"state_dir": str(tmp_path), "store_dir": str(tmp_path)}
    status = nixfarm("gc", "--status", "--json", config=config, tmp_path=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["history"] == []
    assert "--target-free SIZE" in nixfarm("gc", "--help").stdout
    now = nixfarm("gc", "--now", config=config, tmp_path=tmp_path)
    assert_one_line(now, 1, f"the nixfarm agent is not running (nothing answers on {tmp_path}/control.sock)")
    assert_one_line(nixfarm("gc", "--now", "--status"), 2, "not allowed with argument")


def test_commands_that_reach_builders_print_no_library_warnings(tmp_path: Path) -> None:
    # asyncssh's import once printed ten CryptographyDeprecationWarning lines (DSA) on
    # every such command; with warnings as errors, importing them must still work.
    strict = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-c",
            "import nixfarm.client.dispatch, nixfarm.client.doctor, nixfarm.client.sshconn",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert strict.returncode == 0, strict.stderr
    result = nixfarm("status", "--machines", str(tmp_path / "machines"))
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Warning" not in result.stderr


def test_status_fits_80_columns_when_not_a_terminal(tmp_path: Path) -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIVD/QeH8VBuzO9P38u8/KHoysiLVjYoRcWxo75QwzE3"
    line = f"ssh-ng://nixfarm@{{}}.example.org x86_64-linux /etc/nix/nixfarm_ed25519 8 1 kvm - {key}"

    def builder(name: str, state: str, reason: str = "") -> dict[str, object]:
        snapshot = {
            "builds": {"active": 12},
            "nix_config": {"max_jobs": 16},
            "load": {"avg1": 12.34},
            "psi": {"cpu_some_avg10": 100.0},
            "store": {"free_bytes": 1234 * 2**30},
            "gc": {"running": True},
        }
        return {
            "name": name,
            "state": state,
            "reason": reason,
            "last_seen": time.time() - 3 * 86400,
            "line": None if state == "down" else line.format(name),
            "held_back": 12,
            "in_flight": 10,
            "ahead": 3,
            "snapshot": {} if state == "down" else snapshot,
        }

    status = {
        "client": "ci-runner-17",
        "updated": time.time() - 1,
        "machines_file": "/var/lib/nixfarm-client/machines",
        "builders": [
            builder("big-builder-01", "healthy"),
            builder("small", "degraded", "store nearly full: 1.2 GiB free, below min-free 2 GiB"),
            builder("arm-builder-16ch", "down", "unreachable: connection refused (retry in 180 s)"),
        ],
    }
    (tmp_path / "dispatch-status.json").write_text(json.dumps(status))
    result = nixfarm("status", "--machines", str(tmp_path / "machines"), env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, text in enumerate(lines) if text.startswith("builder "))
    table = lines[header : header + 4]
    assert all(len(text) <= 80 for text in table), table
    assert table[0].split() == [
        "builder",
        "state",
        "jobs",
        "mine",
        "held",
        "ahead",
        "load",
        "cpu",
        "free",
        "gc",
        "seen",
    ]
    # Every value whole: nothing folded onto a second line or cut with "…".
    assert table[1].split()[:11] == [
        "big-builder-01",
        "healthy",
        "12/16",
        "10",
        "12",
        "3",
        "12.34",
        "100%",
        "1234G",
        "running",
        "3d",
    ]
    assert table[3].split()[:3] == ["arm-builder-16ch", "down", "-/-"]
    assert "…" not in "\n".join(table)
    # Below it, each reason and each machines line whole, on one line.
    assert "small: degraded: store nearly full: 1.2 GiB free, below min-free 2 GiB" in lines
    assert f"big-builder-01: {line.format('big-builder-01')}" in lines
    assert "arm-builder-16ch: (left out)" in lines
