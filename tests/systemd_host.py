"""A real systemd host on this machine, for testing the agent under systemd.

This machine has no systemd as PID 1 and systemd-nspawn does not work here, so
the fixture boots one by hand:

- a minimal Debian root (debootstrap, cached between runs under
  /var/cache/nixfarm-test, keyed by what goes into it) with systemd, D-Bus,
  Debian's Nix 2.8 (nix-daemon.service/socket and the nixbld users) and the
  agent's Python dependencies;
- per session, an overlay on that root (the cache stays untouched), booted with
  /lib/systemd/systemd as PID 1 of new PID, mount and UTS namespaces, chrooted;
- the repository's agent/ bind-mounted read-only at /opt/nixfarm, with a
  `nixfarm` launcher in /usr/local/bin, so tests run the working tree.

Tests talk to it with `nsenter -t PID -a -r -w` (systemctl, journalctl, busctl,
nix-build, nixfarm) and read its files through /proc/PID/root.

What keeps the machine untouched (each learnt the hard way, see INIT_SCRIPT):
every mount is made in the host's private mount namespace; it gets its own
/dev, /run, /tmp and its own tmpfs at /sys/fs/cgroup holding bind mounts of
the machine's hierarchies; /proc/sys is read-only; systemd starts in a cgroup
of its own (nixfarm-sdhost-ID in every hierarchy) and puts its units below it.
Teardown kills the PID namespace, which ends the mount namespace and every
mount with it, removes the cgroups and the overlay's directory, and then
checks that nothing is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
AGENT_SRC = REPO / "agent"
SUITE = "bookworm"
# Override to build a root from scratch without disturbing the shared cache.
CACHE_DIR = Path(os.environ.get("NIXFARM_TEST_CACHE_DIR", "/var/cache/nixfarm-test"))
WORK_BASE = Path("/var/tmp")  # the overlay's upper layer: on disk, not in RAM
PREFIX = "nixfarm-sdhost-"  # names the work directory and the cgroups of each host
CGROUP_ROOT = Path("/sys/fs/cgroup")
AGENT_MOUNT = "/opt/nixfarm"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_TOOLS = ("debootstrap", "unshare", "nsenter", "chroot", "mount", "mknod")

# What the cached root holds. Compiled Python packages come from Debian (no
# compiler, no -dev packages needed); pure ones the agent pins come from pip
# (see pip_requirements). debootstrap resolves --include dependencies, but not
# virtual packages: nix-bin needs libdbd-sqlite3-perl, which needs the virtual
# perl-dbdabi-94 that libdbi-perl provides, so that one is named here.
PACKAGES = (
    "systemd",  # PID 1, systemctl, journald
    "systemd-sysv",
    "dbus",  # the system bus pydbus talks to
    "nix-bin",  # Nix 2.8: nix-daemon, nix-build
    "nix-setup-systemd",  # nix-daemon.service and .socket, the nixbld group and users
    "libdbi-perl",
    "python3",
    "python3-gi",  # PyGObject, for pydbus
    "python3-pydbus",
    "python3-systemd",  # systemd-python: JournalHandler, sd_notify
)
# Bump when build_root() changes what a root holds in a way the above does not show.
RECIPE = 1

# Units that would reach past the root into the machine: the gettys open the
# console and VTs, modules-load loads kernel modules. (systemd-sysctl and
# systemd-binfmt skip themselves: /proc/sys is read-only.)
MASKED_UNITS = (
    "console-getty.service",
    "getty@.service",
    "serial-getty@.service",
    "systemd-modules-load.service",
)

# Nix inside the host: no substituters (no network to a cache; a lookup would
# wait on DNS for every build), no sandbox (as on the harness builders).
NIX_CONF = """\
build-users-group = nixbld
sandbox = false
substituters =
max-jobs = 2
cores = 1
"""

# Runs as PID 1 of the new PID namespace, in the new mount namespace, and ends
# by exec'ing systemd (which so becomes PID 1). Arguments: lower upper work
# merged agent-src name hierarchy...
INIT_SCRIPT = r"""
set -eu
lower=$1 upper=$2 work=$3 m=$4 agent=$5 name=$6
shift 6
# Start in a cgroup of our own in every hierarchy. systemd takes the cgroup it
# starts in as its root and creates init.scope, system.slice, ... below it,
# never in the machine's top-level cgroups, and it enables only controllers
# whose hierarchy has that cgroup (so all of them must, memory included; not
# v1 cpuset, which systemd does not use and which would need cpus/mems set).
for h in "$@"; do
  if [ -d "$h/$name" ]; then echo 0 > "$h/$name/cgroup.procs"; fi
done

mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$m"
mount --bind "$agent" "$m/opt/nixfarm"
mount -o remount,bind,ro "$m/opt/nixfarm"

mount -t proc proc "$m/proc"
# Read-only /proc/sys, as container managers do: systemd-sysctl and
# systemd-binfmt then skip themselves instead of changing the machine's kernel.
mount --bind "$m/proc/sys" "$m/proc/sys"
mount -o remount,bind,ro "$m/proc/sys"

# /sys without its submounts, and our own tmpfs at /sys/fs/cgroup with bind
# mounts of the machine's hierarchies. systemd remounts /sys/fs/cgroup
# read-only and adds mount points to it: done to the machine's tmpfs (one
# superblock, whatever the mount namespace) that would change it for everyone.
mount --bind /sys "$m/sys"
if [ "$*" = /sys/fs/cgroup ]; then
  mount --bind /sys/fs/cgroup "$m/sys/fs/cgroup"  # pure cgroup v2: one hierarchy
else
  mount -t tmpfs -o mode=755 tmpfs "$m/sys/fs/cgroup"
  for h in "$@"; do mkdir "$m$h"; mount --bind "$h" "$m$h"; done
fi

mount -t tmpfs -o mode=755 tmpfs "$m/run"
mount -t tmpfs -o mode=1777 tmpfs "$m/tmp"
# Our own /dev. devtmpfs has one instance for the whole machine: on it systemd
# would create /dev/log, /dev/initctl and mount points for everyone, and a getty
# would allocate real VTs. /dev/console is a null device, so what PID 1 and the
# units write "to the console" goes nowhere rather than to the machine's.
mount -t tmpfs -o mode=755,nosuid tmpfs "$m/dev"
mknod -m 666 "$m/dev/null" c 1 3
mknod -m 666 "$m/dev/zero" c 1 5
mknod -m 666 "$m/dev/full" c 1 7
mknod -m 666 "$m/dev/random" c 1 8
mknod -m 666 "$m/dev/urandom" c 1 9
mknod -m 666 "$m/dev/tty" c 5 0
mknod -m 600 "$m/dev/console" c 1 3
mkdir "$m/dev/pts"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$m/dev/pts"
ln -s pts/ptmx "$m/dev/ptmx"
ln -s /proc/self/fd "$m/dev/fd"
ln -s fd/0 "$m/dev/stdin"
ln -s fd/1 "$m/dev/stdout"
ln -s fd/2 "$m/dev/stderr"

cd "$m"
exec chroot "$m" /lib/systemd/systemd --system --show-status=false
"""

T = TypeVar("T")


class SystemdHostError(RuntimeError):
    """The systemd host could not be built, booted, reached or cleaned up."""


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, step: float = 0.1) -> T:
    """Call `probe` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def host_missing() -> str | None:
    """What this machine lacks to boot a systemd host, or None."""
    if os.geteuid() != 0:
        return "the systemd host tests need root (namespaces, mounts, cgroups): run tests/run"
    for tool in HOST_TOOLS:
        if not shutil.which(tool, path=PATH):
            return f"the systemd host tests need {tool}, not installed (tests/run installs it)"
    if not cgroup_hierarchies():
        return f"no cgroup hierarchy is mounted under {CGROUP_ROOT}"
    return None


def cgroup_hierarchies() -> list[str]:
    """Mount points of the machine's cgroup hierarchies (v1 and v2), from mountinfo."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            mountpoint = fields[4]
            if fstype in ("cgroup", "cgroup2") and mountpoint.startswith(str(CGROUP_ROOT)):
                found.append(mountpoint)
    return sorted(set(found))


# -- the cached root ---------------------------------------------------------


def debian_mirror(suite: str = SUITE) -> str:
    """The mirror apt uses here for `suite` main (sources.list or deb822 .sources)."""
    sources = Path("/etc/apt")
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in text.split("\n\n"):
                fields: dict[str, list[str]] = {}
                for line in stanza.splitlines():
                    key, sep, value = line.partition(":")
                    if sep and not line.startswith(("#", " ")):
                        fields[key.strip().lower()] = value.split()
                if (
                    "deb" in fields.get("types", [])
                    and suite in fields.get("suites", [])
                    and "main" in fields.get("components", [])
                    and fields.get("uris")
                ):
                    return fields["uris"][0]
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if words[:1] != ["deb"]:
                    continue
                words = words[1:]
                if words and words[0].startswith("["):  # [signed-by=... arch=...]
                    while words and not words[0].endswith("]"):
                        words.pop(0)
                    words = words[1:]
                if len(words) >= 3 and words[1] == suite and "main" in words[2:]:
                    return words[0]
    raise SystemdHostError(
        f"no Debian mirror for {suite} main in /etc/apt/sources.list*: "
        "debootstrap needs one to build the systemd host's root"
    )


def pip_requirements() -> list[str]:
    """The agent's own runtime requirements (pyproject.toml), installed into the root by pip.

    Debian's python3-pyroute2 would do, but python3-asyncssh (2.10) is older
    than the agent's pin, so the pins are taken as they are.
    """
    with open(AGENT_SRC / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def root_key() -> str:
    """A hash of everything that goes into the root: a new recipe gets a new root."""
    spec = {"suite": SUITE, "packages": PACKAGES, "pip": pip_requirements(), "recipe": RECIPE}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _run_logged(argv: list[str], what: str, timeout: float, hint: str) -> None:
    """Run a root-building step; on failure raise naming the step, the hint and its output."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemdHostError(f"{what} took longer than {timeout:.0f} s; {hint}") from None
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        raise SystemdHostError(f"{what} failed (exit {r.returncode}); {hint}\n{tail}")


def debootstrap(target: Path, suite: str, packages: Sequence[str]) -> None:
    """A minimal Debian `suite` with `packages` in `target`, every package installed."""
    mirror = debian_mirror()
    _run_logged(
        # In a mount namespace of its own: whatever debootstrap mounts in the
        # target (/proc, /sys) goes away with it, even if it is killed.
        ["unshare", "--mount", "--propagation", "private",
         "debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
         suite, str(target), mirror],
        f"debootstrap of Debian {suite} from {mirror}",
        900,
        f"it needs network access to the Debian mirror {mirror} (from /etc/apt/sources.list*)",
    )  # fmt: skip
    # debootstrap exits 0 even when a package failed to configure: check them all.
    r = subprocess.run(
        ["chroot", str(target), "dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n",
         *packages],
        capture_output=True, text=True,
    )  # fmt: skip
    broken = [line for line in r.stdout.splitlines() if not line.rstrip().endswith("ii")]
    if r.returncode != 0 or broken:
        raise SystemdHostError(
            f"debootstrap left packages not installed in the root: {broken or r.stderr.strip()}"
        )


def pip_into_root(target: Path, requirements: Sequence[str]) -> None:
    """`requirements` for the root's own Python, by the host's pip."""
    python = subprocess.run(
        ["chroot", str(target), "python3", "-c",
         "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    _run_logged(
        # Wheels only, for the root's Python version: nothing is compiled
        # against the host's libraries.
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--only-binary=:all:", "--python-version", python,
         "--target", str(target / f"usr/local/lib/python{python}/dist-packages"),
         *requirements],
        f"pip install {' '.join(requirements)} into the root",
        600,
        "it needs the Python package index (PyPI) that pip is configured with",
    )  # fmt: skip


def build_root(target: Path) -> None:
    """debootstrap a root into `target`, add the pip packages, check that it works."""
    debootstrap(target, SUITE, PACKAGES)
    pip_into_root(target, pip_requirements())
    _run_logged(
        ["chroot", str(target), "python3", "-c",
         "import asyncssh, gi, pydbus, pyroute2, systemd.daemon, systemd.journal"],
        "importing the agent's dependencies in the root",
        60,
        "the root is incomplete",
    )  # fmt: skip


def ensure_root() -> Path:
    """The cached root for the current recipe, built first if needed (~70 s).

    Built in a temporary directory and renamed into place, under a lock, so a
    root in the cache is always complete and two sessions never build at once.
    """
    final = CACHE_DIR / f"systemd-root-{root_key()}"
    if final.is_dir():
        return final
    CACHE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        for stale in CACHE_DIR.glob(".build-*"):  # a build that was killed; we hold the lock
            shutil.rmtree(stale)
        tmp = CACHE_DIR / f".build-{secrets.token_hex(4)}"
        try:
            build_root(tmp)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        in_use = live_roots()
        for old in CACHE_DIR.glob("systemd-root-*"):  # older recipes, ~450 MB each
            if old != final and str(old) not in in_use:
                shutil.rmtree(old)
    return final


# -- the booted host ---------------------------------------------------------


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when pytest dies, so a killed run leaves no host running."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _remove_cgroup_tree(path: Path, timeout: float = 10) -> None:
    """rmdir a cgroup and its children, deepest first, waiting for their processes to exit."""
    deadline = time.monotonic() + timeout
    while path.exists():
        try:
            for dirpath, _, _ in sorted(os.walk(path), key=lambda w: -w[0].count("/")):
                os.rmdir(dirpath)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _machine_state() -> dict[str, Any]:
    """What a host must never change on the machine: entries of /dev and /sys/fs/cgroup
    and the options of those mounts (the mistakes INIT_SCRIPT guards against)."""
    options = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] in ("/dev", str(CGROUP_ROOT)):
                options[fields[4]] = fields[5] + " " + fields[-1]
    return {
        "/dev": sorted(os.listdir("/dev")),
        str(CGROUP_ROOT): sorted(os.listdir(CGROUP_ROOT)),
        "mounts": options,
    }


def _live_work_dirs() -> Iterator[Path]:
    """Work directories of hosts whose test session is still running (it holds the lock)."""
    for work in WORK_BASE.glob(f"{PREFIX}*"):
        try:
            fd = os.open(work / "lock", os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield work
        finally:
            os.close(fd)


def live_roots() -> set[str]:
    """The cached roots that running hosts have mounted (never delete those)."""
    roots = set()
    for work in _live_work_dirs():
        with contextlib.suppress(OSError):
            roots.add((work / "lower").read_text())
    return roots


def reap_stale() -> None:
    """Remove the work directory and cgroups of hosts whose test session was killed.

    A live host's session holds a lock on its work directory; a killed one's
    processes died with it (PR_SET_PDEATHSIG, --kill-child), leaving only files.
    """
    live = set(_live_work_dirs())
    for work in WORK_BASE.glob(f"{PREFIX}*"):
        if work in live:
            continue
        for hierarchy in cgroup_hierarchies():
            _remove_cgroup_tree(Path(hierarchy) / work.name)
        shutil.rmtree(work, ignore_errors=True)  # another session may be reaping it too


class SystemdHost:
    """One booted systemd host; `start()`, use, `close()` (also after a failure)."""

    def __init__(self, root: Path) -> None:
        self.lower = root
        self.name = PREFIX + secrets.token_hex(3)
        self.work = WORK_BASE / self.name
        self.pid = 0  # systemd, as the machine sees it
        self.unshare: subprocess.Popen[bytes] | None = None
        self.hierarchies = cgroup_hierarchies()
        self._lock_fd = -1
        self._machine_before: dict[str, Any] = {}

    # -- start -------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Boot systemd and wait until the system is up (is-system-running says running)."""
        reap_stale()
        self._machine_before = _machine_state()
        # Locked under a name reap_stale() ignores, then renamed: a live host's
        # directory is never seen unlocked.
        hidden = WORK_BASE / f".{self.name}"
        hidden.mkdir(mode=0o755)
        self._lock_fd = os.open(hidden / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        (hidden / "lower").write_text(str(self.lower))  # for live_roots()
        os.rename(hidden, self.work)
        (self.work / "init.sh").write_text(INIT_SCRIPT)
        for d in ("upper", "overlay-work", "merged"):
            (self.work / d).mkdir(mode=0o755)
        self._populate(self.work / "upper")
        for hierarchy in self.hierarchies:
            if not hierarchy.endswith("/cpuset"):  # see INIT_SCRIPT
                os.mkdir(Path(hierarchy) / self.name)
        log = (self.work / "boot.log").open("wb")
        self.unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--uts", "--propagation", "private",
             "--kill-child=SIGKILL",
             "sh", str(self.work / "init.sh"),
             str(self.lower), str(self.work / "upper"), str(self.work / "overlay-work"),
             str(self.work / "merged"), str(AGENT_SRC), self.name, *self.hierarchies],
            # `container=`: systemd then knows it is not the machine's init (no
            # console setup; units with ConditionVirtualization=!container skip).
            env={"PATH": PATH, "container": "nixfarm-test"},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
        log.close()
        self.pid = wait_for("the systemd host's init process", self._systemd_pid, 30)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            r = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=timeout)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.2)  # the manager's bus is not up yet
        if state != "running":
            failed = self.run(["systemctl", "--failed", "--no-pager"], check=False).stdout
            raise SystemdHostError(f"systemd host did not come up ({state!r}):\n{failed}")
        # A builder has a store; Debian's Nix creates it only on first use.
        self.run(["nix-store", "--init"])

    def _systemd_pid(self) -> int | None:
        """systemd's PID once the init script has exec'd it; raises if unshare died."""
        assert self.unshare is not None
        if self.unshare.poll() is not None:
            raise SystemdHostError(
                f"the systemd host exited at boot: {(self.work / 'boot.log').read_text()[-2000:]}"
            )
        pid = self.unshare.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if len(children) != 1:
            return None
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{children[0]}/exe").endswith("/systemd"):
                return int(children[0])
        return None

    def _populate(self, upper: Path) -> None:
        """Files of this host, written into the overlay's upper layer before it is mounted."""
        system = upper / "etc/systemd/system"
        system.mkdir(parents=True)
        for unit in MASKED_UNITS:
            (system / unit).symlink_to("/dev/null")
        (upper / "etc/hostname").write_text("nixfarm-sdhost\n")
        (upper / "etc/nix").mkdir()
        (upper / "etc/nix/nix.conf").write_text(NIX_CONF)
        (upper / AGENT_MOUNT.lstrip("/")).mkdir(parents=True)
        launcher = upper / "usr/local/bin/nixfarm"
        launcher.parent.mkdir(parents=True)
        # What `pip install` would make, pointing at the read-only bind mount of agent/.
        launcher.write_text(
            "#!/usr/bin/python3\nimport sys\n"
            f"sys.path.insert(0, {AGENT_MOUNT!r})\n"
            "from nixfarm.cli import main\nsys.exit(main())\n"
        )
        launcher.chmod(0o755)

    # -- use ---------------------------------------------------------------

    def run(
        self,
        argv: list[str],
        check: bool = True,
        timeout: float = 60,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the host (all its namespaces, its root) as root, clean environment."""
        cmd = ["nsenter", "-t", str(self.pid), "-a", "-r", "-w", "--", *argv]
        r = subprocess.run(
            cmd,
            text=True,
            capture_output=True,
            timeout=timeout,
            input=input,
            env={"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root", **(env or {})},
        )
        if check and r.returncode != 0:
            raise SystemdHostError(
                f"{' '.join(argv)} failed in the systemd host (exit {r.returncode}):\n{r.stdout}{r.stderr}"
            )
        return r

    def systemctl(self, *args: str, check: bool = True) -> str:
        """`systemctl ARGS` in the host; its stdout."""
        return self.run(["systemctl", "--no-pager", *args], check=check).stdout

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """Properties of a unit, as `systemctl show -p` prints them."""
        args = [a for p in properties for a in ("-p", p)]
        out = self.systemctl("show", unit, *args)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def path(self, inside: str) -> Path:
        """A path of the host's file system, as the machine reaches it."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def write(self, inside: str, text: str) -> None:
        """Write a file in the host (parents created)."""
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def journal_cursor(self) -> str:
        """The journal's current end, for `journal_since()`."""
        out = self.run(["journalctl", "--no-pager", "-n", "0", "--show-cursor"]).stdout
        return out.strip().rsplit("-- cursor: ", 1)[-1]

    def journal(self, *args: str) -> list[dict[str, Any]]:
        """Journal entries as JSON objects (`journalctl -o json ARGS`), oldest first."""
        out = self.run(["journalctl", "--no-pager", "-o", "json", *args]).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def journal_since(self, cursor: str, **fields: str) -> list[dict[str, Any]]:
        """Entries after `cursor` whose fields have the given values.

        Filtered here, not with journalctl matches: journalctl 252 with
        --after-cursor and a match drops the first matching entry when the
        cursor's own entry does not match (checked on this host).
        """
        entries = self.journal(f"--after-cursor={cursor}")
        return [e for e in entries if all(e.get(k) == v for k, v in fields.items())]

    # -- teardown ----------------------------------------------------------

    def close(self) -> None:
        """Kill every process of the host, remove its cgroups and files, check for leftovers."""
        if self.pid:
            # SIGKILL to PID 1 ends the whole PID namespace; the mount namespace,
            # and every mount made in it, goes with its last process.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self.unshare is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.unshare.pid, signal.SIGKILL)
            self.unshare.wait(timeout=30)
        errors = []
        for hierarchy in self.hierarchies:
            try:
                _remove_cgroup_tree(Path(hierarchy) / self.name)
            except OSError as e:
                errors.append(f"cgroup {hierarchy}/{self.name}: {e}")
        if self.work.exists():
            shutil.rmtree(self.work, ignore_errors=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        left = errors + self.leftovers()
        if left:
            raise SystemdHostError("the systemd host left things behind: " + "; ".join(left))

    def leftovers(self) -> list[str]:
        """Anything of this host still on the machine: mounts, processes, cgroups, files,
        and changes to /dev or /sys/fs/cgroup."""
        found = []
        with open("/proc/self/mountinfo") as f:
            found += [f"mount {line.split()[4]}" for line in f if str(self.work) in line]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(entry / "root").startswith(str(self.work)):
                        found.append(f"process {entry.name}")
        found += [f"cgroup {h}/{self.name}" for h in self.hierarchies if Path(h, self.name).exists()]
        if self.work.exists():
            found.append(f"directory {self.work}")
        if self._machine_before:
            now = _machine_state()
            for key, before in self._machine_before.items():
                if key == "mounts":
                    if now[key] != before:
                        found.append(f"mount options changed: {before} -> {now[key]}")
                else:
                    found += [f"new entry {key}/{n}" for n in sorted(set(now[key]) - set(before))]
        return found


@pytest.fixture(scope="session", name="systemd_host")
def systemd_host_fixture() -> Iterator[SystemdHost]:
    """A booted systemd host for the whole session; torn down at its end, pass or fail.

    Where the machine lacks something (root, a tool, network to the Debian
    mirror or to PyPI on the first run) this fails with a message naming it:
    it never skips.
    """
    missing = host_missing()
    if missing:
        pytest.fail(missing, pytrace=False)
    try:
        root = ensure_root()
    except SystemdHostError as e:
        pytest.fail(str(e), pytrace=False)
    host = SystemdHost(root)
    try:
        try:
            host.start()
        except SystemdHostError as e:
            pytest.fail(str(e), pytrace=False)
        yield host
    finally:
        host.close()
