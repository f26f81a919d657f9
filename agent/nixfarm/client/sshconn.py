"""How nixfarm reaches a builder over SSH, the way nix-daemon's ssh does.

Shared by `nixfarm dispatch`, `doctor`, `builds` and `usage`: the client's
own key only (no agent, no ssh_config of whoever runs us), strict host-key
checking against the one key the inventory pins for that builder, and
answers read with bounds in size and time.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncssh

from .inventory import Builder

MAX_STDERR = 8192


def pinned_known_hosts(builder: Builder) -> tuple[list[asyncssh.SSHKey], list[Any], list[Any]]:
    """asyncssh `known_hosts` that trusts only this builder's key, whatever the host name."""
    return ([asyncssh.import_public_key(builder.host_key)], [], [])


def connect_options(
    key_file: str,
    builder: Builder,
    *,
    connect_timeout: float,
) -> dict[str, Any]:
    """asyncssh.connect() arguments: the client key, the pinned host key, the connect timeout.

    No keepalives: the dispatcher turns them on itself, only while a stream is silent."""
    return {
        "host": builder.address,
        "port": builder.port,
        "username": builder.ssh_user,
        "client_keys": [key_file],
        "known_hosts": pinned_known_hosts(builder),
        "agent_path": None,
        "config": None,
        "connect_timeout": connect_timeout,
    }


async def read_bounded(stream: asyncssh.SSHReader[bytes], limit: int) -> tuple[bytes, bool]:
    """Up to `limit` bytes until end of file; True if there was more."""
    data = b""
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return data, False
        data += chunk
        if len(data) > limit:
            return data[:limit], True


async def read_line(stream: asyncssh.SSHReader[bytes], limit: int) -> tuple[bytes, str]:
    """The first line, up to `limit` bytes: (data, "line" | "eof" | "too long")."""
    data = b""
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return data, "eof"
        data += chunk
        if b"\n" in data[:limit]:
            return data.split(b"\n", 1)[0], "line"
        if len(data) > limit:
            return data[:limit], "too long"


class Answer:
    """What a command run through the gateway answered, read with bounds."""

    def __init__(self, line: bytes, how: str, status: int | None, stderr: bytes) -> None:
        self.line = line  # the first line of stdout
        self.how = how  # "line" | "eof" | "too long"
        self.status = status  # exit status if it ended without a line; else None
        self.stderr = stderr


async def run_for_line(
    conn: asyncssh.SSHClientConnection, command: str, limit: int, timeout: float
) -> Answer:
    """Run `command` through the gateway and take its first line of output.

    Returns once a line is there (a hostile builder may keep the session
    open after it); without one, waits for the exit status and stderr.
    """

    async def session() -> Answer:
        proc = await conn.create_process(command, encoding=None)
        try:
            proc.stdin.write_eof()
            line, how = await read_line(proc.stdout, limit)
            if how != "eof":
                return Answer(line, how, None, b"")
            err, _ = await read_bounded(proc.stderr, MAX_STDERR)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait_closed(), 5)
            return Answer(line, how, proc.exit_status, err)
        finally:
            proc.close()

    return await asyncio.wait_for(session(), timeout)
