"""Nix 2.26 for the farm harness: Debian 13's nix-bin and OpenSSH 10 in a cached root.

The machine has Debian 12's Nix 2.8 and OpenSSH 9.2. The Nix that users run is
newer (NixOS 25.05: Nix 2.28, OpenSSH 10), and Debian 13 packages the closest
one this machine can install: Nix 2.26.3 with OpenSSH 10.0p2. So a
`debootstrap --variant=minbase trixie` root with them is built once and cached
next to the systemd tests' root (same directory, same lock-and-rename), and a
builder or a client "on Nix 2.26" runs its Nix and ssh chrooted into that root.

The root is entered read-only (the cache stays as it was built; a write
anywhere but the mounts below fails loudly) with, in a private mount namespace:
its own /nix (a tmpfs for a builder, a directory of the farm for a client),
tmpfs /run, /tmp and /root, the machine's /dev, /sys and /proc, the machine's
/etc/passwd, group and shadow (so the builder user and the nixbld users are
the same ones, with the same ids, inside and out), and the farm's directory at
its own path (keys, configs and logs keep their paths).

The gateway must run inside the root too: sshd execs the authorized_keys
command there. The host's venv cannot: its python is the host's 3.11 with
libraries and compiled packages built against Debian 12, while the root has
Python 3.13. So, as the systemd tests do, the root gets the agent's runtime
requirements from pip for its own Python, and the working tree's agent/ is
bind-mounted read-only at /opt/nixfarm with a launcher at /usr/local/bin/nixfarm:
the gateway and agent of a 2.26 builder are this working tree on the root's
Python.

Usage (a client's Nix in the root): python nix_root.py ENTER_SPEC_JSON -- argv...
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
AGENT_SRC = HERE.parent / "agent"
SUITE = "trixie"
NIX_VERSIONS = ("2.8", "2.26")  # "2.8": the machine's own Nix; "2.26": this root's
AGENT_MOUNT = "/opt/nixfarm"
LAUNCHER = "/usr/local/bin/nixfarm"
# What the root holds. debootstrap does not resolve virtual packages: nix-bin needs
# libdbd-sqlite3-perl, which needs perl-dbdabi-94, which libdbi-perl provides.
PACKAGES = (
    "nix-bin",  # Nix 2.26.3
    "openssh-server",  # OpenSSH 10.0p2: sshd, sshd-session, sshd-auth
    "openssh-client",
    "libdbi-perl",
    "procps",  # ps and pkill, which tests run on builders
    "python3",  # 3.13: runs the gateway and the agent (see above)
)
# Mount points the read-only root must already have (see enter_mounts).
MOUNT_POINTS = ("nix", "etc/nix", AGENT_MOUNT.lstrip("/"), "var/lib/nixfarm-builder")
# Bump when build_root() changes what a root holds in a way the above does not show.
RECIPE = 1


class NixRootError(RuntimeError):
    """The Nix 2.26 root could not be built or entered."""


# -- the cached root -----------------------------------------------------------


def cache_dir() -> Path:
    from systemd_host import CACHE_DIR  # the systemd tests' cache, and its override

    return CACHE_DIR


def root_key() -> str:
    """A hash of everything that goes into the root: a new recipe gets a new root."""
    from systemd_host import pip_requirements

    spec = {"suite": SUITE, "packages": PACKAGES, "pip": pip_requirements(), "recipe": RECIPE}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def build_root(target: Path) -> None:
    """debootstrap Debian 13 into `target`, add the agent's requirements, check it works."""
    from systemd_host import SystemdHostError, debootstrap, pip_into_root, pip_requirements

    try:
        debootstrap(target, SUITE, PACKAGES)
        for d in MOUNT_POINTS:
            (target / d).mkdir(mode=0o755, parents=True, exist_ok=True)
        launcher = target / LAUNCHER.lstrip("/")
        launcher.write_text(
            f"#!/usr/bin/python3\nimport sys\nsys.path.insert(0, {AGENT_MOUNT!r})\n"
            "from nixfarm.cli import main\nsys.exit(main())\n"
        )
        launcher.chmod(0o755)
        pip_into_root(target, pip_requirements())
        run_in(target, ["python3", "-c", "import asyncssh, pyroute2, rich"])
        # (Not `nix-store --version`: Nix needs /proc, which a chroot here has not.)
        version = run_in(target, ["dpkg-query", "-W", "-f=${Version}", "nix-bin"])
        if not version.startswith("2.26.3"):
            raise NixRootError(f"expected Nix 2.26.3 in the {SUITE} root, found {version!r}")
    except SystemdHostError as e:
        raise NixRootError(str(e)) from None


def run_in(root: Path, argv: list[str]) -> str:
    """Run argv chrooted in a root being built; its stdout, or NixRootError."""
    r = subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True)
    if r.returncode != 0:
        raise NixRootError(f"{' '.join(argv)} in {root} failed: {r.stderr.strip()[-2000:]}")
    return r.stdout.strip()


def ensure_root() -> Path:
    """The cached root for the current recipe, built first if needed (~80 s).

    Built in a temporary directory and renamed into place, under the cache's
    lock, so a root in the cache is always complete and two sessions never
    build at once. Roots of older recipes are left alone: another session (an
    older checkout) may have one mounted.
    """
    cache = cache_dir()
    final = cache / f"nix-2.26-root-{root_key()}"
    if final.is_dir():
        return final
    cache.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        tmp = cache / f".build-{secrets.token_hex(4)}"
        try:
            build_root(tmp)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return final


# -- entering it ---------------------------------------------------------------


def enter_mounts(root: str, nix: str, store_size: str, binds: list[tuple[str, str]]) -> list[list[str]]:
    """The mount commands that make `root` a host to chroot into (see the module docstring).

    `nix` is a directory to bind at /nix, or "" for a tmpfs of `store_size`.
    `binds` are (source, target-inside) pairs on top of the fixed ones; every
    target is either a mount point the root was built with or below /run.
    Run in a private mount namespace (nothing may leak into the machine's).
    """
    r = root
    cmds = [
        ["mount", "--bind", r, r],  # a mount point of its own, to make read-only
        ["mount", "-o", "remount,bind,ro", r],
        ["mount", "--bind", nix, f"{r}/nix"]
        if nix
        else ["mount", "-t", "tmpfs", "-o", f"size={store_size},mode=0755", "tmpfs", f"{r}/nix"],
        ["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", f"{r}/run"],
        ["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", f"{r}/tmp"],
        ["mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", f"{r}/root"],
        ["mount", "-t", "proc", "proc", f"{r}/proc"],
        ["mount", "--rbind", "/dev", f"{r}/dev"],
        ["mount", "--rbind", "/sys", f"{r}/sys"],
        ["mount", "--bind", "-o", "ro", str(AGENT_SRC), f"{r}{AGENT_MOUNT}"],
        ["mkdir", "-p", f"{r}/run/sshd"],  # sshd's privilege-separation directory
    ]
    for name in ("passwd", "group", "shadow"):
        cmds.append(["mount", "--bind", f"/etc/{name}", f"{r}/etc/{name}"])
    for source, target in binds:
        if target.startswith("/run/"):
            cmds.append(["mkdir", "-p", f"{r}{target}"])
        cmds.append(["mount", "--bind", source, f"{r}{target}"])
    return cmds


def setup(spec: dict) -> None:
    """Mount and chroot into the root as `spec` says (in a private mount namespace)."""
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    binds = [(source, target) for source, target in spec.get("binds", [])]
    for cmd in enter_mounts(spec["root"], spec.get("nix", ""), spec.get("store_size", ""), binds):
        subprocess.run(cmd, check=True)
    os.chroot(spec["root"])
    os.chdir("/")


def main() -> None:
    spec = json.loads(sys.argv[1])
    if sys.argv[2] != "--":
        sys.exit("usage: nix_root.py SPEC_JSON -- argv...")
    setup(spec)
    os.execvp(sys.argv[3], sys.argv[3:])  # noqa: S606 - argv from the harness, no shell


if __name__ == "__main__":
    main()
