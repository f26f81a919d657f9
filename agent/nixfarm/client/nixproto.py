"""The client side of Nix's remote protocols, as far as `nixfarm doctor` needs it.

`ssh-ng://` runs `nix-daemon --stdio` on the builder and speaks the worker
protocol (Nix: src/libstore/worker-protocol.hh, the client in
src/libstore/remote-store.cc `RemoteStore::initConnection`, the daemon in
src/libstore/daemon.cc `processConnection`). Every number is a uint64,
little-endian; a string is its length, its bytes and zero padding to a
multiple of 8. The handshake:

    client -> WORKER_MAGIC_1
    daemon -> WORKER_MAGIC_2, its protocol version (major << 8 | minor)
    client -> its protocol version
              0 (obsolete CPU affinity)   if the common minor >= 14
              0 (obsolete reserveSpace)   if the common minor >= 11
    daemon -> its Nix version (a string)   if the common minor >= 33
              trusted: 0 unknown, 1 yes, 2 no   if the common minor >= 35
              log messages, then STDERR_LAST (or STDERR_ERROR)

Each side decides by the other's version, so both follow min(ours, theirs).
We offer 1.37: enough for the 1.35 trust flag, below 1.38, which adds a
feature-set exchange. Nix 2.8 (this machine's) speaks 1.34 and says nothing
about trust in the handshake; there we ask with `wopSetOptions` and a
setting name no Nix knows: the daemon applies a trusted client's settings
without comment and logs "ignoring the client-specified setting ..., because
it is a restricted setting and you are not a trusted user" for anyone else
(at debug level in 2.8, a warning in later versions; we ask for debug).

`ssh://` runs `nix-store --serve --write` (src/libstore/serve-protocol.hh):
client -> SERVE_MAGIC_1, its version; server -> SERVE_MAGIC_2, its version.

Everything read is bounded: a hostile builder gets a ProtocolError, never a
huge allocation or a hang (the caller adds the timeout).
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

WORKER_MAGIC_1 = 0x6E697863
WORKER_MAGIC_2 = 0x6478696F
CLIENT_VERSION = 1 << 8 | 37
STDERR_NEXT = 0x6F6C6D67
STDERR_READ = 0x64617461
STDERR_WRITE = 0x64617416
STDERR_LAST = 0x616C7473
STDERR_ERROR = 0x63787470
STDERR_START_ACTIVITY = 0x53545254
STDERR_STOP_ACTIVITY = 0x53544F50
STDERR_RESULT = 0x52534C54
WOP_SET_OPTIONS = 19
LVL_DEBUG = 6  # Verbosity: lvlError 0, lvlWarn, lvlNotice, lvlInfo, lvlTalkative, lvlChatty, lvlDebug
TRUST_PROBE_SETTING = "nixfarm-doctor-trust-probe"
UNTRUSTED_TEXT = "not a trusted user"

SERVE_MAGIC_1 = 0x390C9DEB
SERVE_MAGIC_2 = 0x5452EECB
SERVE_CLIENT_VERSION = 2 << 8 | 6

MAX_STRING = 64 << 10  # a version string or a log line; more is not a daemon talking
MAX_MESSAGES = 10_000  # log messages before STDERR_LAST
MAX_FIELDS = 64
MAX_TRACES = 256

# readexactly(n) of the channel; raises EOFError or asyncio.IncompleteReadError at its end.
Read = Callable[[int], Awaitable[bytes]]
Write = Callable[[bytes], None]


class ProtocolError(Exception):
    """The other side did not speak the protocol (garbage, a refusal, a truncated answer)."""


class DaemonError(ProtocolError):
    """The daemon answered with an error (STDERR_ERROR); the message is Nix's."""


@dataclass
class DaemonHello:
    """What the worker-protocol handshake told us."""

    daemon_version: int  # what the daemon speaks
    version: int  # what this connection speaks: min(ours, the daemon's)
    nix_version: str | None  # protocol >= 1.33
    trusted: bool | None  # protocol >= 1.35 and the daemon knows; else None
    messages: list[str] = field(default_factory=list)


def version_text(version: int) -> str:
    """'1.34' for 0x122."""
    return f"{version >> 8}.{version & 0xFF}"


def minor(version: int) -> int:
    """The minor protocol version (GET_PROTOCOL_MINOR)."""
    return version & 0xFF


def u64(n: int) -> bytes:
    """A number as Nix writes it: uint64, little-endian."""
    return struct.pack("<Q", n)


def nix_string(data: bytes) -> bytes:
    """A string as Nix writes it: length, bytes, zero padding to 8."""
    return u64(len(data)) + data + b"\0" * (-len(data) % 8)


def client_version_message(daemon_version: int) -> bytes:
    """What the client sends after reading the daemon's version: ours, then the obsolete fields."""
    common = min(daemon_version, CLIENT_VERSION)
    out = u64(CLIENT_VERSION)
    if minor(common) >= 14:
        out += u64(0)  # obsolete CPU affinity: "none"
    if minor(common) >= 11:
        out += u64(0)  # obsolete reserveSpace: false
    return out


def set_options_message(version: int, overrides: dict[str, str], verbosity: int = LVL_DEBUG) -> bytes:
    """wopSetOptions as RemoteStore::setOptions sends it (12 numbers, then the overrides)."""
    numbers = [
        0,  # keepFailed
        0,  # keepGoing
        0,  # tryFallback
        verbosity,  # the daemon sends us its log messages up to this level
        1,  # maxBuildJobs
        0,  # maxSilentTime
        1,  # obsolete useBuildHook
        7,  # verboseBuild: lvlVomit means "not verbose"
        0,  # obsolete logType
        0,  # obsolete printBuildTrace
        0,  # buildCores
        0,  # useSubstitutes
    ]
    out = u64(WOP_SET_OPTIONS) + b"".join(u64(n) for n in numbers)
    if minor(version) >= 12:
        out += u64(len(overrides))
        for name, value in overrides.items():
            out += nix_string(name.encode()) + nix_string(value.encode())
    return out


async def read_u64(read: Read) -> int:
    """One number."""
    return int(struct.unpack("<Q", await _read(read, 8))[0])


async def read_string(read: Read, limit: int = MAX_STRING) -> bytes:
    """One string, at most `limit` bytes."""
    size = await read_u64(read)
    if size > limit:
        raise ProtocolError(f"a string of {size} bytes (at most {limit} expected)")
    data = await _read(read, size + (-size % 8))
    return data[:size]


async def read_text(read: Read, limit: int = MAX_STRING) -> str:
    """One string as text; undecodable bytes are replaced, never an exception."""
    return (await read_string(read, limit)).decode("utf-8", errors="replace")


async def _read(read: Read, n: int) -> bytes:
    try:
        data = await read(n)
    except EOFError:  # asyncio.IncompleteReadError is an EOFError
        raise ProtocolError("the connection closed in the middle of the protocol") from None
    if len(data) != n:
        raise ProtocolError("the connection closed in the middle of the protocol")
    return data


async def _skip_fields(read: Read) -> None:
    count = await read_u64(read)
    if count > MAX_FIELDS:
        raise ProtocolError(f"a log record with {count} fields")
    for _ in range(count):
        kind = await read_u64(read)
        if kind == 0:
            await read_u64(read)
        elif kind == 1:
            await read_string(read)
        else:
            raise ProtocolError(f"a log field of unknown type {kind}")


async def read_error(read: Read, version: int) -> str:
    """The message of a STDERR_ERROR (protocol >= 1.26: a serialised Error; older: text, status)."""
    if minor(version) < 26:
        message = await read_text(read)
        await read_u64(read)  # exit status
        return message
    if await read_text(read) != "Error":
        raise ProtocolError("an error record that does not start with 'Error'")
    await read_u64(read)  # level
    await read_text(read)  # name (always "Error" now)
    message = await read_text(read)
    if await read_u64(read) != 0:
        raise ProtocolError("an error record with a position (never sent by Nix)")
    traces = await read_u64(read)
    if traces > MAX_TRACES:
        raise ProtocolError(f"an error record with {traces} traces")
    for _ in range(traces):
        await read_u64(read)  # position: always 0
        await read_text(read)
    return message


async def read_stderr(read: Read, version: int) -> list[str]:
    """Log messages up to STDERR_LAST (RemoteStore::processStderr); DaemonError on STDERR_ERROR."""
    messages: list[str] = []
    for _ in range(MAX_MESSAGES):
        kind = await read_u64(read)
        if kind == STDERR_LAST:
            return messages
        if kind == STDERR_ERROR:
            raise DaemonError(await read_error(read, version))
        if kind == STDERR_NEXT:
            messages.append((await read_text(read)).rstrip("\n"))
        elif kind == STDERR_START_ACTIVITY:
            await read_u64(read)  # activity id
            await read_u64(read)  # level
            await read_u64(read)  # type
            text = await read_text(read)
            await _skip_fields(read)
            await read_u64(read)  # parent
            if text:
                messages.append(text)
        elif kind == STDERR_STOP_ACTIVITY:
            await read_u64(read)
        elif kind == STDERR_RESULT:
            await read_u64(read)  # activity id
            await read_u64(read)  # result type
            await _skip_fields(read)
        elif kind in (STDERR_READ, STDERR_WRITE):
            raise ProtocolError("the daemon asked for a data transfer we never started")
        else:
            raise ProtocolError(f"unknown log message type {kind:#x}")
    raise ProtocolError(f"more than {MAX_MESSAGES} log messages without an end")


async def handshake(read: Read, write: Write) -> DaemonHello:
    """The client side of the worker-protocol handshake, up to the first STDERR_LAST."""
    write(u64(WORKER_MAGIC_1))
    magic = await read_u64(read)
    if magic != WORKER_MAGIC_2:
        raise ProtocolError(
            f"not a Nix daemon: it answered {magic:#x}, not WORKER_MAGIC_2 {WORKER_MAGIC_2:#x}"
        )
    daemon_version = await read_u64(read)
    if daemon_version >> 8 != CLIENT_VERSION >> 8:
        raise ProtocolError(f"daemon protocol {version_text(daemon_version)}: major version 1 expected")
    if minor(daemon_version) < 10:
        raise ProtocolError(f"daemon protocol {version_text(daemon_version)} is too old (at least 1.10)")
    write(client_version_message(daemon_version))
    version = min(daemon_version, CLIENT_VERSION)
    nix_version = await read_text(read, 256) if minor(version) >= 33 else None
    trusted = None
    if minor(version) >= 35:
        flag = await read_u64(read)
        if flag not in (0, 1, 2):
            raise ProtocolError(f"trust flag {flag} (0, 1 or 2 expected)")
        trusted = {0: None, 1: True, 2: False}[flag]
    messages = await read_stderr(read, version)
    return DaemonHello(daemon_version, version, nix_version, trusted, messages)


async def probe_trust(read: Read, write: Write, hello: DaemonHello) -> tuple[bool, list[str]]:
    """Whether the daemon trusts us, from its answer to a restricted setting (protocol >= 1.12).

    Returns (trusted, the daemon's messages). Costs one round trip and changes
    nothing: the setting name is unknown to Nix, and a daemon's settings live
    only as long as this connection.
    """
    write(set_options_message(hello.version, {TRUST_PROBE_SETTING: "1"}))
    messages = await read_stderr(read, hello.version)
    refused = any(UNTRUSTED_TEXT in m and TRUST_PROBE_SETTING in m for m in messages)
    return not refused, messages


async def serve_handshake(read: Read, write: Write) -> int:
    """The client side of `nix-store --serve`'s handshake; returns the server's version."""
    write(u64(SERVE_MAGIC_1) + u64(SERVE_CLIENT_VERSION))
    magic = await read_u64(read)
    if magic != SERVE_MAGIC_2:
        raise ProtocolError(
            f"not nix-store --serve: it answered {magic:#x}, not SERVE_MAGIC_2 {SERVE_MAGIC_2:#x}"
        )
    version = await read_u64(read)
    if version >> 8 != 2:
        raise ProtocolError(f"serve protocol {version_text(version)}: major version 2 expected")
    return version
