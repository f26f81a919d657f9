"""`nixfarm ssh-masters`: keep a shared SSH connection to every builder open, always.

With connection sharing (the client module's `connectionSharing`), nix-daemon's
ssh runs each build's session over a master connection (`ControlMaster auto`).
When no master is up, several builds that start at once each try to become
it; the losers connect on their own and print the line Nix 2.16+ waits for
only when `ssh -O check` finds no master, which by then it does: the build
fails ("protocol mismatch, got 'started'", NixOS/nix#14132) or hangs. Measured
with real Nix 2.26, bursts of 4 builds on an idle builder: 4 to 8 of 120
builds lost without a master kept up, none of 120 with one (README
"Connection sharing").

So this service (root, the same ssh and ssh_config as nix-daemon's) makes
sure a master exists for every builder: `ssh -O check`, and where there is
none, `ssh -N -f` with `ControlMaster yes` and `ControlPersist yes`, every
CHECK_EVERY seconds, one thread per builder so that an unreachable builder
(its `ConnectTimeout`) holds up no other.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
import threading

CHECK_EVERY = 2.0  # seconds without a master at most, after one exits
MASTER_TIMEOUT = 60.0  # ssh -f returns once the connection is up (or failed)

log = logging.getLogger("nixfarm.masters")


def master_running(ssh: list[str], host: str) -> bool:
    result = subprocess.run([*ssh, "-O", "check", host], capture_output=True, timeout=30)
    return result.returncode == 0


def start_master(ssh: list[str], host: str) -> str:
    """Open a master to `host` in the background; "" if it is up, else why not."""
    argv = [
        *ssh,
        "-o",
        "ControlMaster=yes",
        "-o",
        "ControlPersist=yes",
        "-o",
        "BatchMode=yes",
        "-N",
        "-f",
        host,
    ]
    # Not a pipe for stderr: the master that ssh -f leaves behind keeps it open, and
    # reading it to its end would wait for the master to exit.
    with tempfile.TemporaryFile() as err:
        try:
            result = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, timeout=MASTER_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            return f"no connection within {MASTER_TIMEOUT:g} s"
        err.seek(0)
        lines = err.read(8192).decode(errors="replace").strip().splitlines()
    if result.returncode != 0:
        return lines[-1] if lines else f"ssh exited with {result.returncode}"
    return ""


def keep(ssh: list[str], host: str, stop: threading.Event) -> None:
    """Keep a master to `host` until `stop`; say once when it cannot be had, and when it is back."""
    failing = ""
    while not stop.is_set():
        try:
            why = "" if master_running(ssh, host) else start_master(ssh, host)
        except (OSError, subprocess.TimeoutExpired) as e:
            why = str(e)
        if why and why != failing:
            log.warning("%s: no shared connection (%s); builds there connect on their own", host, why)
        elif not why and failing:
            log.info("%s: shared connection up again", host)
        failing = why
        stop.wait(CHECK_EVERY)


def run_masters(ssh: list[str], hosts: list[str], stop: threading.Event | None = None) -> int:
    """Keep a master to every host until SIGTERM (or `stop`)."""
    stop = stop or threading.Event()
    threads = [threading.Thread(target=keep, args=(ssh, h, stop), name=h, daemon=True) for h in hosts]
    for t in threads:
        t.start()
    try:
        stop.wait()
    except KeyboardInterrupt:
        stop.set()
    return 0
