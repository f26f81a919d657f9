"""Which client each gateway session serves, as the gateway records it for the agent.

sshd runs every client's sessions as the one builder user, and the Nix
processes the gateway execs (`nix-daemon --stdio`, `nix-store --serve`) say
nothing about whom they serve. So, just before it execs one, or starts a
metrics stream, the gateway leaves a file in `state_dir/sessions/` named after
its PID (an exec keeps the PID) with the client's name and the process's
start time, which tells a reused PID apart. The agent service reads them to
account builds and traffic per client (accounts.py) and removes the files of
sessions that ended.

The directory is the agent's (root), group `control_group`, mode 0770, as
for demand.py; without it (no agent) the gateway records nothing.
"""

from __future__ import annotations

import contextlib
import os
import time

DIRECTORY = "sessions"
MAX_FILES = 4096  # read per look: more open sessions than any builder serves
MAX_FILE = 128  # bytes: a client name (at most 64) and a number


def sessions_dir(state_dir: str) -> str:
    return os.path.join(state_dir, DIRECTORY)


def start_ticks(pid: int | str, proc: str = "/proc") -> int:
    """When the process started (clock ticks since boot, /proc/PID/stat field 22)."""
    with open(f"{proc}/{pid}/stat", "rb") as f:
        # After the command name, which may hold spaces and ')'.
        return int(f.read().rpartition(b")")[2].split()[19])


def record_session(state_dir: str, client: str) -> None:
    """Say that this process serves `client`. Best effort: a session is never refused for it.

    One open, write and close: this runs on every session before nix-daemon starts.
    """
    path = os.path.join(sessions_dir(state_dir), str(os.getpid()))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    except OSError:
        return
    try:
        os.write(fd, f"{client} {start_ticks('self')}\n".encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def live_sessions(state_dir: str, proc: str = "/proc") -> dict[int, str]:
    """PID -> client of every recorded session still running; the others' files are removed."""
    directory = sessions_dir(state_dir)
    try:
        names = os.listdir(directory)
    except OSError:
        return {}
    live = {}
    for name in names[:MAX_FILES]:
        if not name.isdigit():
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                record = f.read(MAX_FILE)
            client, started = record.decode().split()
            alive = start_ticks(name, proc) == int(started)
        except (UnicodeDecodeError, ValueError):
            alive = False
            if not record and _young(path):
                continue  # created a moment ago, not written yet
        except OSError:  # the process ended (or the file went)
            alive = False
        if alive:
            live[int(name)] = client
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return live


def _young(path: str) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime < 10
    except OSError:
        return False
