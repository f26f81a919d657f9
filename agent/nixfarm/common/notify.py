"""sd_notify readiness and watchdog pings; no-ops outside systemd.

Uses systemd-python where it is installed, else writes the datagram itself
(the protocol is one line per message on $NOTIFY_SOCKET).
"""

from __future__ import annotations

import os
import socket

JOURNAL_SOCKET = "/run/systemd/journal/socket"


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1") to systemd; False where there is no systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    try:
        from systemd import daemon

        return bool(daemon.notify(message))
    except ImportError:
        pass
    if address.startswith("@"):  # abstract socket namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            # Never block the service on a slow reader of the socket.
            s.sendto(message.encode(), socket.MSG_DONTWAIT, address)
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of WatchdogSec), or None when not asked."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.05)
    except ValueError:
        return None
