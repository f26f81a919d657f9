"""The client side of Nix's worker and serve protocols, byte for byte.

The expected bytes follow Nix's src/libstore/remote-store.cc (initConnection,
setOptions, processStderr), src/libstore/daemon.cc (processConnection) and
src/libutil/serialise.cc (strings, errors). doctor's harness tests run the
same code against the real Nix 2.8 daemon.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from nixfarm.client import nixproto as p

T = TypeVar("T")


def converse(daemon_bytes: bytes, talk: Callable[[p.Read, p.Write], Awaitable[T]]) -> tuple[T, bytes]:
    """Run `talk` against a peer that has sent `daemon_bytes` and then closed; (result, what we sent)."""
    sent = bytearray()

    async def main() -> T:
        reader = asyncio.StreamReader()
        reader.feed_data(daemon_bytes)
        reader.feed_eof()
        return await talk(reader.readexactly, sent.extend)

    return asyncio.run(main()), bytes(sent)


def daemon_greeting(version: int) -> bytes:
    return p.u64(p.WORKER_MAGIC_2) + p.u64(version)


def test_encoding() -> None:
    assert p.u64(0x6E697863) == b"cxin\0\0\0\0"  # "nixc" little-endian
    assert p.nix_string(b"2.8.0") == p.u64(5) + b"2.8.0\0\0\0"
    assert p.nix_string(b"") == p.u64(0)
    assert p.nix_string(b"12345678") == p.u64(8) + b"12345678"
    assert p.version_text(0x122) == "1.34" and p.CLIENT_VERSION == 0x125


def test_handshake_with_nix_2_8() -> None:
    # Nix 2.8 speaks 1.34: it sends its version string (>= 1.33) but no trust flag (1.35).
    reply = daemon_greeting(0x122) + p.nix_string(b"2.8.0") + p.u64(p.STDERR_LAST)
    hello, sent = converse(reply, p.handshake)
    assert sent == p.u64(p.WORKER_MAGIC_1) + p.u64(0x125) + p.u64(0) + p.u64(0)
    assert (hello.daemon_version, hello.version, hello.nix_version, hello.trusted) == (
        0x122,
        0x122,
        "2.8.0",
        None,
    )


@pytest.mark.parametrize(("flag", "trusted"), [(1, True), (2, False), (0, None)])
def test_handshake_with_the_trust_flag(flag: int, trusted: bool | None) -> None:
    # A 1.38 daemon talks 1.37 with us: no feature exchange (1.38), a trust flag (1.35).
    reply = daemon_greeting(0x126) + p.nix_string(b"2.24.10") + p.u64(flag) + p.u64(p.STDERR_LAST)
    hello, sent = converse(reply, p.handshake)
    assert sent == p.u64(p.WORKER_MAGIC_1) + p.u64(0x125) + p.u64(0) + p.u64(0)
    assert hello.version == 0x125 and hello.nix_version == "2.24.10" and hello.trusted is trusted


def test_handshake_with_an_old_daemon() -> None:
    # 1.10: no affinity (>= 1.14), no reserveSpace (>= 1.11), no version string (>= 1.33).
    hello, sent = converse(daemon_greeting(0x10A) + p.u64(p.STDERR_LAST), p.handshake)
    assert sent == p.u64(p.WORKER_MAGIC_1) + p.u64(0x125)
    assert hello.version == 0x10A and hello.nix_version is None
    _, sent = converse(daemon_greeting(0x10C) + p.u64(p.STDERR_LAST), p.handshake)
    assert sent == p.u64(p.WORKER_MAGIC_1) + p.u64(0x125) + p.u64(0)  # reserveSpace only


def test_log_messages_and_activities_before_stderr_last() -> None:
    fields = p.u64(2) + p.u64(0) + p.u64(42) + p.u64(1) + p.nix_string(b"x")
    start = p.u64(p.STDERR_START_ACTIVITY) + p.u64(7) + p.u64(3) + p.u64(100) + p.nix_string(b"copying")
    start += fields + p.u64(0)
    result = p.u64(p.STDERR_RESULT) + p.u64(7) + p.u64(101) + fields
    stop = p.u64(p.STDERR_STOP_ACTIVITY) + p.u64(7)
    log = p.u64(p.STDERR_NEXT) + p.nix_string(b"warning: hello\n")
    reply = (
        daemon_greeting(0x122) + p.nix_string(b"2.8.0") + log + start + result + stop + p.u64(p.STDERR_LAST)
    )
    hello, _ = converse(reply, p.handshake)
    assert hello.messages == ["warning: hello", "copying"]


def test_daemon_error_is_reported() -> None:
    # Protocol >= 1.26: "Error", level, name, message, no position, traces (position 0, hint).
    error = p.nix_string(b"Error") + p.u64(0) + p.nix_string(b"Error") + p.nix_string(b"invalid operation 0")
    error += p.u64(0) + p.u64(1) + p.u64(0) + p.nix_string(b"while doing it")
    reply = daemon_greeting(0x122) + p.nix_string(b"2.8.0") + p.u64(p.STDERR_ERROR) + error
    with pytest.raises(p.DaemonError, match="invalid operation 0"):
        converse(reply, p.handshake)
    # Older: the message and an exit status.
    reply = daemon_greeting(0x119) + p.u64(p.STDERR_ERROR) + p.nix_string(b"old failure") + p.u64(1)
    with pytest.raises(p.DaemonError, match="old failure"):
        converse(reply, p.handshake)


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (b"SSH-2.0-OpenSSH\r\n", "not a Nix daemon"),
        (b"", "closed in the middle"),
        (p.u64(p.WORKER_MAGIC_2), "closed in the middle"),
        (daemon_greeting(0x222), "major version 1 expected"),
        (daemon_greeting(0x109), "too old"),
        (daemon_greeting(0x122) + p.u64(1 << 60), "a string of 1152921504606846976 bytes"),
        (daemon_greeting(0x122) + p.nix_string(b"2.8.0") + p.u64(0xDEAD), "unknown log message type"),
        (daemon_greeting(0x122) + p.nix_string(b"2.8.0") + p.u64(p.STDERR_READ), "data transfer"),
        (daemon_greeting(0x125) + p.nix_string(b"x") + p.u64(7), "trust flag 7"),
    ],
)
def test_hostile_or_broken_daemons(reply: bytes, match: str) -> None:
    with pytest.raises(p.ProtocolError, match=match):
        converse(reply, p.handshake)


def test_undecodable_text_is_replaced_not_raised() -> None:
    reply = daemon_greeting(0x122) + p.nix_string(b"\xff\xfe2.8") + p.u64(p.STDERR_LAST)
    hello, _ = converse(reply, p.handshake)
    assert hello.nix_version == "\ufffd\ufffd2.8"


def test_set_options_layout() -> None:
    message = p.set_options_message(0x122, {"a-setting": "1"})
    numbers = [int.from_bytes(message[i : i + 8], "little") for i in range(0, 13 * 8, 8)]
    assert numbers[0] == p.WOP_SET_OPTIONS and len(numbers[1:]) == 12
    assert numbers[4] == p.LVL_DEBUG  # verbosity: 2.8 logs the refusal at debug level
    assert message[13 * 8 :] == p.u64(1) + p.nix_string(b"a-setting") + p.nix_string(b"1")
    assert p.set_options_message(0x10B, {"x": "1"}) == message[: 13 * 8]  # no overrides before 1.12


def test_trust_probe() -> None:
    hello = p.DaemonHello(0x122, 0x122, "2.8.0", None)
    refusal = (
        f"ignoring the client-specified setting '{p.TRUST_PROBE_SETTING}', "
        "because it is a restricted setting and you are not a trusted user\n"
    ).encode()
    untrusted = p.u64(p.STDERR_NEXT) + p.nix_string(refusal) + p.u64(p.STDERR_LAST)
    (trusted, messages), sent = converse(untrusted, lambda r, w: p.probe_trust(r, w, hello))
    assert trusted is False and len(messages) == 1
    assert sent == p.set_options_message(0x122, {p.TRUST_PROBE_SETTING: "1"})
    (trusted, _), _ = converse(p.u64(p.STDERR_LAST), lambda r, w: p.probe_trust(r, w, hello))
    assert trusted is True


def test_serve_handshake() -> None:
    version, sent = converse(p.u64(p.SERVE_MAGIC_2) + p.u64(0x206), p.serve_handshake)
    assert version == 0x206
    assert sent == p.u64(p.SERVE_MAGIC_1) + p.u64(0x206)
    with pytest.raises(p.ProtocolError, match="not nix-store --serve"):
        converse(p.u64(p.WORKER_MAGIC_2) + p.u64(0x122), p.serve_handshake)
