"""PID 1 of a harness builder: set up its mounts, start nix-daemon and sshd, reap.

Runs inside `ip netns exec NS unshare -m -p --fork --mount-proc --kill-child`,
so it is the init of the builder's own PID namespace. When it dies the kernel
kills everything in that namespace, and the mount namespace (with the tmpfs
/nix) goes away with the last process: nothing can be left behind.

Usage: farm_init.py SPEC.json   (written by tests/farm.py)
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import nix_root


def setup_mounts(spec: dict) -> None:
    if "nix_root" in spec:
        # Nix 2.26: chroot into the Debian 13 root, with its own tmpfs /nix and our /etc/nix.
        root = spec["nix_root"]
        nix_root.setup({**root, "binds": [*root["binds"], [spec["etc_nix"], "/etc/nix"]]})
    else:
        # Nothing we mount may leak back into the host's mount namespace.
        subprocess.run(["mount", "--make-rprivate", "/"], check=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={spec['store_size']},mode=0755", "tmpfs", "/nix"],
            check=True,
        )
        subprocess.run(["mount", "--bind", spec["etc_nix"], "/etc/nix"], check=True)
    os.makedirs("/nix/store", mode=0o1775, exist_ok=True)
    os.makedirs("/nix/var/nix/daemon-socket", exist_ok=True)
    os.makedirs("/nix/var/nix/gcroots", exist_ok=True)
    # Pre-created, world-readable slot files for benchmarks that emulate cores (DESIGN.md).
    os.makedirs("/nix/var/nixfarm-slots", exist_ok=True)
    for i in range(spec.get("slots", 0)):
        with open(f"/nix/var/nixfarm-slots/{i}", "w"):
            pass
        os.chmod(f"/nix/var/nixfarm-slots/{i}", 0o444)


def join_cgroup(procs_file: str) -> None:
    """preexec_fn: move the new process (nix-daemon) into the builder's memory cgroup."""
    # Raw os.write: buffered file objects are unsafe between fork and exec.
    fd = os.open(procs_file, os.O_WRONLY)
    try:
        os.write(fd, str(os.getpid()).encode())
    finally:
        os.close(fd)


def start_daemons(spec: dict) -> None:
    cgroup = spec.get("cgroup_procs")
    log = open(spec["daemon_log"], "ab")  # noqa: SIM115 - stays open for the daemon's life
    subprocess.Popen(
        [spec["nix_daemon"]],
        stdout=log,
        stderr=log,
        preexec_fn=(lambda: join_cgroup(cgroup)) if cgroup else None,
    )
    # Without -D sshd forks into the background and becomes our child (we are init).
    subprocess.run([spec["sshd"], "-f", spec["sshd_config"], "-E", spec["sshd_log"]], check=True)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    socket.sethostname(spec["hostname"])  # its own UTS namespace: metrics and builds name it
    setup_mounts(spec)
    start_daemons(spec)
    deadline = time.monotonic() + 30
    while not os.path.exists("/nix/var/nix/daemon-socket/socket"):
        if time.monotonic() > deadline:
            sys.exit("nix-daemon did not create its socket within 30 s; see " + spec["daemon_log"])
        time.sleep(0.02)
    with open(spec["ready_file"], "w") as f:
        f.write(str(os.getpid()))
    # As PID 1 we get no default signal actions; SIGTERM means "stop the builder".
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        try:
            os.wait()  # reap everything orphaned to us, so no zombie lingers
        except ChildProcessError:
            time.sleep(0.2)


if __name__ == "__main__":
    main()
