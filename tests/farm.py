"""A local multi-host build farm made of real components (see DESIGN.md "How we test").

Each builder is a network namespace (pyroute2: netns, veth, addresses) with
its own mount and PID namespaces, its own tmpfs /nix of a given size, its own
/etc/nix, nix-daemon, OpenSSH sshd with its own host key, and a builder user
whose authorized_keys lines force `nixfarm gateway`. The client is the host
namespace, using the host's Nix and ssh.

    with Farm() as farm:
        farm.add_client("alice")
        b = farm.add_builder("b1", clients={"alice": "build"})
        farm.ssh("alice", b, "nixfarm metrics --json")

Closing the farm (also on an exception) kills each builder's PID namespace,
removes its netns, veth and cgroup and deletes the farm's directory.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute, NetNS, netns

import nix_root

BUILDER_USER = "nixfarm"
BUILDER_HOME = "/var/lib/nixfarm-builder"
BUILD_USERS_GROUP = "nixbld"
PREFIX = "nft"  # names of every netns, veth and cgroup the harness makes
CGROUP_ROOT = "/sys/fs/cgroup"
HERE = Path(__file__).resolve().parent


class FarmError(RuntimeError):
    """The harness could not set up or reach a builder."""


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    """Run argv; FarmError with its stderr if it fails."""
    result = subprocess.run(argv, text=True, capture_output=True, **kw)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise FarmError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result  # type: ignore[no-any-return]


def program(name: str) -> str:
    path = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if not path:
        raise FarmError(f"{name} is not installed (tests/run installs it)")
    return path


def keygen(path: Path, comment: str) -> None:
    """An ed25519 key pair without a passphrase at `path` and `path`.pub."""
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


@functools.cache
def current_system() -> str:
    """Nix's name for this machine's platform (asked once: it costs a process)."""
    return run(["nix-instantiate", "--eval", "--expr", "builtins.currentSystem"]).stdout.strip().strip('"')


def ensure_builder_user() -> None:
    """The builder user sshd lets in; shared by all harness builders (own keys each)."""
    os.makedirs(BUILDER_HOME, mode=0o755, exist_ok=True)  # also bound into 2.26 builders
    try:
        run(["getent", "passwd", BUILDER_USER])
    except FarmError:
        run(["useradd", "--system", "--home-dir", BUILDER_HOME, "--shell", "/bin/sh", BUILDER_USER])
    # sshd refuses locked accounts ('!' in /etc/shadow); '*' means "no password" instead.
    run(["usermod", "-p", "*", BUILDER_USER])
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir


def ensure_build_users(count: int = 32) -> None:
    """Nix's build users (group nixbld, users nixbld1..count), which every builder's
    nix-daemon builds as. Debian's nix-setup-systemd makes them, but it pulls in
    systemd, which this machine does not boot; the NixOS module gets them from nixpkgs."""
    if subprocess.run(["getent", "group", BUILD_USERS_GROUP], capture_output=True).returncode != 0:
        run(["groupadd", "--system", BUILD_USERS_GROUP])
    for i in range(1, count + 1):
        name = f"{BUILD_USERS_GROUP}{i}"
        if subprocess.run(["getent", "passwd", name], capture_output=True).returncode == 0:
            continue
        # Nix takes the build users from the group's member list, so -G as well as -g.
        group = BUILD_USERS_GROUP
        run(["useradd", "--system", "--no-create-home", "--home-dir", "/var/empty",
             "--shell", "/usr/sbin/nologin", "-g", group, "-G", group, name])  # fmt: skip


def memory_cgroup_kind() -> str:
    """'v1' where the memory controller is on cgroup v1 (this machine), else 'v2'."""
    if os.path.isdir(f"{CGROUP_ROOT}/memory"):
        return "v1"
    return "v2"


@dataclass
class Builder:
    """One harness builder; `address` is reachable from the host namespace."""

    name: str
    index: int  # position in its farm (names its veth)
    farm_id: str
    root: Path
    store_size: str
    address: str = ""
    host_key: str = ""  # "ssh-ed25519 AAAA..." (public)
    unshare: subprocess.Popen[bytes] | None = None
    init_pid: int = 0  # PID of its init, as the host sees it
    cgroup: str = ""  # absolute cgroup directory, if a memory cgroup was made
    clients: dict[str, str] = field(default_factory=dict)  # client -> role
    agents: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)  # agent PID -> its nsenter
    nix: str = "2.8"  # "2.8": the machine's Nix and sshd; "2.26": those of the Debian 13 root
    nixfarm: str = ""  # the `nixfarm` program as the builder sees it

    def nsenter(self) -> list[str]:
        """The nsenter argv prefix that runs a program inside this builder as root.

        -r -w: a 2.26 builder's init is chrooted into its root, and so is what joins it.
        """
        return ["nsenter", "-t", str(self.init_pid), "-m", "-n", "-p", "-r", "-w", "--"]

    def logins(self) -> int:
        """Logins its sshd has accepted so far (a session over a shared connection is none)."""
        return (self.root / "sshd.log").read_text().count("Accepted publickey")

    @property
    def netns(self) -> str:
        return f"{PREFIX}{self.farm_id}-{self.name}"

    @property
    def host_veth(self) -> str:
        return f"{PREFIX}{self.farm_id}v{self.index}"  # <= 15 chars

    @property
    def client_address(self) -> str:
        """The host namespace's address on this builder's link (where clients come from)."""
        return self.address.rsplit(".", 1)[0] + ".1"

    @property
    def host_key_b64(self) -> str:
        """The public host key as Nix's machines file wants it (base64 of the line)."""
        return base64.b64encode(self.host_key.encode()).decode()

    def exec(
        self, argv: list[str], check: bool = True, timeout: float = 60, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside this builder (its mount, net and PID namespaces) as root."""
        return subprocess.run(  # type: ignore[call-overload]
            [*self.nsenter(), *argv], check=check, text=True, capture_output=True, timeout=timeout, **kw
        )

    def processes(self) -> list[tuple[int, str]]:
        """(pid, cmdline) of every process in this builder, as it sees them."""
        out = self.exec(["ps", "-e", "-ww", "-o", "pid=,args="]).stdout
        result = []
        for line in out.splitlines():
            pid, _, args = line.strip().partition(" ")
            if args.startswith("ps -e"):
                continue
            result.append((int(pid), args.strip()))
        return result

    def kill_sshd(self) -> None:
        """Stop the builder's SSH service: sshd and every connection it serves. OpenSSH 10
        serves each connection in sshd-session (and sshd-auth), which outlive sshd itself."""
        self.exec(["pkill", "-x", "sshd|sshd-session|sshd-auth"], check=False)
        deadline = time.monotonic() + 5
        while any(cmd.startswith("sshd") for _, cmd in self.processes()):
            if time.monotonic() > deadline:
                raise FarmError(f"sshd on {self.name} survived pkill")
            time.sleep(0.05)

    def set_link(self, up: bool) -> None:
        """Cut or restore the builder's network (its veth, from the host side)."""
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.host_veth)[0]
            ipr.link("set", index=idx, state="up" if up else "down")

    def machines_line(self, key: Path, protocol: str = "ssh-ng", max_jobs: int = 2, speed: int = 1) -> str:
        """A Nix machines-file line for this builder."""
        system = current_system()
        uri = f"{protocol}://{BUILDER_USER}@{self.address}"
        return f"{uri} {system} {key} {max_jobs} {speed} - - {self.host_key_b64}"


class Farm:
    """A set of harness builders and client keys under one directory; a context manager."""

    def __init__(self, base: str = "/run") -> None:
        # Not under /tmp: sshd's StrictModes rejects authorized_keys below a world-writable dir.
        self.id = secrets.token_hex(3)
        self.root = Path(base) / f"nixfarm-test-{self.id}"
        self.root.mkdir(mode=0o755)
        self.builders: dict[str, Builder] = {}
        self.client_keys: dict[str, Path] = {}
        self.known_hosts = self.root / "known_hosts"
        self.known_hosts.touch()
        self.python = sys.executable
        # pyroute2's NetNS forks helper processes that run on in copies of this
        # process; only the one that made the farm may tear it down (close()).
        self._owner = os.getpid()
        self.nixfarm = str(Path(sys.executable).parent / "nixfarm")
        ensure_builder_user()
        ensure_build_users()
        # Each builder mounts its own tmpfs store and nix.conf over these, in its own mount
        # namespace; Debian's nix-bin creates neither, Nix's first run only /nix.
        for mount_point in ("/nix", "/etc/nix"):
            os.makedirs(mount_point, mode=0o755, exist_ok=True)

    def __enter__(self) -> Farm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- clients -----------------------------------------------------------

    def add_client(self, name: str) -> Path:
        """Make an ed25519 key pair for client `name`; returns the private key path."""
        key = self.root / "clients" / name / "id_ed25519"
        key.parent.mkdir(parents=True, mode=0o700)
        keygen(key, f"nixfarm-client-{name}")
        self.client_keys[name] = key
        return key

    def ssh_argv(self, client: str, builder: Builder, *extra: str) -> list[str]:
        """The ssh argv a client uses to reach a builder, strict host-key checking on."""
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(self.client_keys[client]),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ConnectTimeout=5",
            *extra,
            f"{BUILDER_USER}@{builder.address}",
        ]

    def shared_ssh_options(self, client: str) -> str:
        """NIX_SSHOPTS that make `client`'s Nix share one SSH connection per builder, as the
        client module's connectionSharing does (modules/lib.nix, sshHostBlock).

        Each client has its own socket directory: a master shared by two clients would
        run both clients' sessions under the key of the one that opened it. The masters
        end with the builders (stop_builder kills their sshd).
        """
        directory = self.root / f"mux-{client}"  # with %C (40 bytes) well under a socket path's 107
        directory.mkdir(mode=0o700, exist_ok=True)
        return f"-oControlMaster=auto -oControlPath={directory}/%C -oControlPersist=60"

    def ssh(
        self,
        client: str,
        builder: Builder,
        command: str | None,
        *extra: str,
        timeout: float = 30,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` on `builder` over SSH with `client`'s key (no check)."""
        argv = self.ssh_argv(client, builder, *extra)
        if command is not None:
            argv.append(command)
        return subprocess.run(
            argv,
            text=True,
            capture_output=True,
            timeout=timeout,
            input=input if input is not None else "",
        )

    def make_signing_key(self, name: str) -> tuple[Path, str]:
        """A Nix signing key pair named `name` (as the client module makes one): the secret
        key file (root-only, under the farm's directory, so a Nix 2.26 client's chroot sees
        it at the same path) and the public key "name:base64" for trusted-public-keys."""
        directory = self.root / "signing-keys"
        directory.mkdir(mode=0o700, exist_ok=True)
        secret, public = directory / name, directory / f"{name}.pub"
        run(["nix-store", "--generate-binary-cache-key", name, str(secret), str(public)])
        secret.chmod(0o600)
        return secret, public.read_text().strip()

    # -- builders ----------------------------------------------------------

    def add_builder(
        self,
        name: str,
        clients: dict[str, str],
        store_size: str = "64m",
        max_jobs: int = 4,
        slots: int = 0,
        memory_max: int | None = None,
        nix_conf: str = "",
        agent_config: dict[str, object] | None = None,
        sshd_match_block: bool = True,
        nix: str = "2.8",
        trusted: bool = True,
        trusted_public_keys: list[str] | None = None,
    ) -> Builder:
        """Start a builder host; `clients` maps client name to gateway role.

        `nix="2.26"` runs its nix-daemon, sshd, gateway and agent from the cached
        Debian 13 root (tests/nix_root.py) instead of the machine's Nix 2.8.

        `sshd_match_block=False` leaves out the sshd `Match User` block, so that
        only `restrict` in authorized_keys stands between a key and a shell.

        `trusted=False` keeps the builder user out of `trusted-users`, as the builder
        module does in the farm's untrusted mode; `trusted_public_keys` are the Nix
        signing keys ("name:base64", see make_signing_key) whose paths it then accepts.
        """
        index = len(self.builders) + 1
        if index > 200:
            raise FarmError("at most 200 builders per farm")
        if nix not in nix_root.NIX_VERSIONS:
            raise FarmError(f"no Nix {nix!r} here; the harness has {', '.join(nix_root.NIX_VERSIONS)}")
        b = Builder(name, index, self.id, self.root / "builders" / name, store_size, clients=dict(clients),
                    nix=nix, nixfarm=self.nixfarm if nix == "2.8" else nix_root.LAUNCHER)  # fmt: skip
        self.builders[name] = b
        b.root.mkdir(parents=True, mode=0o755)
        self._make_network(b)
        trust = f"trusted-users = root{f' {BUILDER_USER}' if trusted else ''}\n"
        if trusted_public_keys:
            trust += f"trusted-public-keys = {' '.join(trusted_public_keys)}\n"
        self._write_builder_files(b, max_jobs, trust + nix_conf, agent_config or {}, sshd_match_block)
        if memory_max is not None:
            b.cgroup = self._make_cgroup(b, memory_max)
        self._start(b, slots)
        with self.known_hosts.open("a") as f:
            f.write(f"{b.address} {b.host_key}\n")
        return b

    def _write_builder_files(
        self,
        b: Builder,
        max_jobs: int,
        nix_conf: str,
        agent_config: dict[str, object],
        match_block: bool,
    ) -> None:
        hostkey = b.root / "ssh_host_ed25519_key"
        keygen(hostkey, f"{b.name}-host")
        b.host_key = " ".join(hostkey.with_suffix(".pub").read_text().split()[:2])
        keys_dir = b.root / "authorized_keys"
        keys_dir.mkdir(mode=0o755)
        lines = []
        for client, role in b.clients.items():
            pub = self.client_keys[client].with_suffix(".pub").read_text().strip()
            lines.append(f'restrict,command="{b.nixfarm} gateway --client {client} --role {role}" {pub}\n')
        (keys_dir / BUILDER_USER).write_text("".join(lines))
        state = b.root / "state"
        state.mkdir(mode=0o755)
        gateway_log = b.root / "gateway.log"
        gateway_log.touch()
        shutil.chown(gateway_log, user=BUILDER_USER)
        config = {
            "state_dir": str(state),
            "gateway_log": str(gateway_log),
            "network_interfaces": ["eth0"],
            "control_group": BUILDER_USER,  # the gateway's admin role asks the agent for GC
            **agent_config,
        }
        (b.root / "agent.json").write_text(json.dumps(config))
        etc_nix = b.root / "etc-nix"
        etc_nix.mkdir(mode=0o755)
        (etc_nix / "nix.conf").write_text(
            textwrap.dedent(f"""\
            build-users-group = {BUILD_USERS_GROUP}
            max-jobs = {max_jobs}
            cores = 1
            sandbox = false
            substituters =
            experimental-features = nix-command
            """)
            + nix_conf
        )
        # Mirrors what the NixOS builder module writes: a Match block on top of `restrict`.
        (b.root / "sshd_config").write_text(
            textwrap.dedent(f"""\
            ListenAddress {b.address}
            HostKey {hostkey}
            PidFile {b.root}/sshd.pid
            AuthorizedKeysFile {keys_dir}/%u
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            PubkeyAuthentication yes
            PermitRootLogin no
            UsePAM no
            StrictModes yes
            AllowUsers {BUILDER_USER}
            LogLevel VERBOSE
            SetEnv NIXFARM_CONFIG={b.root}/agent.json
            Subsystem sftp /usr/lib/openssh/sftp-server
            """)
            + (
                textwrap.dedent(f"""\
            Match User {BUILDER_USER}
              AllowTcpForwarding no
              AllowAgentForwarding no
              AllowStreamLocalForwarding no
              PermitTunnel no
              PermitTTY no
              X11Forwarding no
            """)
                if match_block
                else ""
            )
        )

    def _make_network(self, b: Builder) -> None:
        netns.create(b.netns)
        # Farms may run side by side (tests, benchmarks, the demo): pick a /24 no other
        # link on this machine has, under a lock so two farms never pick the same one.
        with open("/run/nixfarm-harness.lock", "w") as lock, IPRoute() as ipr:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)}
            subnet = next((i for i in range(1, 255) if f"10.201.{i}.1" not in used), None)
            if subnet is None:
                raise FarmError("no free 10.201.x.0/24 subnet for another builder")
            b.address = f"10.201.{subnet}.2"
            ipr.link(
                "add",
                ifname=b.host_veth,
                kind="veth",
                peer={"ifname": "eth0", "net_ns_fd": b.netns},
            )
            idx = ipr.link_lookup(ifname=b.host_veth)[0]
            ipr.addr("add", index=idx, address=f"10.201.{subnet}.1", prefixlen=24)
            ipr.link("set", index=idx, state="up")
        with NetNS(b.netns) as ns:
            for ifname in ("lo", "eth0"):
                idx = ns.link_lookup(ifname=ifname)[0]
                ns.link("set", index=idx, state="up")
            eth0 = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=eth0, address=b.address, prefixlen=24)

    def _make_cgroup(self, b: Builder, memory_max: int) -> str:
        name = f"{PREFIX}{self.id}-{b.name}"
        if memory_cgroup_kind() == "v1":
            path = f"{CGROUP_ROOT}/memory/{name}"
            os.mkdir(path)
            Path(path, "memory.limit_in_bytes").write_text(str(memory_max))
        else:
            path = f"{CGROUP_ROOT}/{name}"
            os.mkdir(path)
            Path(path, "memory.max").write_text(str(memory_max))
        return path

    def _start(self, b: Builder, slots: int) -> None:
        ready = b.root / "ready"
        spec = {
            "hostname": b.name,
            "store_size": b.store_size,
            "etc_nix": str(b.root / "etc-nix"),
            "nix_daemon": program("nix-daemon"),
            "sshd": program("sshd"),
            "sshd_config": str(b.root / "sshd_config"),
            "sshd_log": str(b.root / "sshd.log"),
            "daemon_log": str(b.root / "nix-daemon.log"),
            "ready_file": str(ready),
            "slots": slots,
            "cgroup_procs": f"{b.cgroup}/cgroup.procs" if b.cgroup else None,
        }
        if b.nix == "2.26":
            # The same programs, from the root it chroots into (they have the same paths there).
            spec["nix_root"] = {
                "root": str(nix_root.ensure_root()),
                "store_size": b.store_size,
                "binds": [[str(self.root), str(self.root)], [BUILDER_HOME, BUILDER_HOME]],
            }
        (b.root / "spec.json").write_text(json.dumps(spec))
        log = (b.root / "init.log").open("wb")
        b.unshare = subprocess.Popen(
            # nsenter rather than `ip netns exec`, which mounts a fresh /sys and so
            # would hide /sys/fs/cgroup from the builder (and from its metrics).
            [
                "nsenter",
                f"--net=/run/netns/{b.netns}",
                "--",
                "unshare",
                "--mount",
                "--uts",
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child=SIGKILL",
                self.python,
                str(HERE / "farm_init.py"),
                str(b.root / "spec.json"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not ready.exists():
            if b.unshare.poll() is not None or time.monotonic() > deadline:
                raise FarmError(
                    f"builder {b.name} did not start: {(b.root / 'init.log').read_text()[-2000:]}"
                )
            time.sleep(0.02)
        b.init_pid = self._child_of(b.unshare.pid)

    @staticmethod
    def _child_of(pid: int) -> int:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if len(children) != 1:
            raise FarmError(f"expected one child of unshare {pid}, found {children}")
        return int(children[0])

    def write_inventory(
        self,
        client: str,
        builders: list[Builder],
        max_jobs: int = 2,
        trust: str | None = None,
        signing_key_file: Path | None = None,
    ) -> Path:
        """The client inventory `nixfarm dispatch` reads (as the NixOS client module writes it).

        `trust` None leaves the farm's mode out, as inventories before it did (meaning "trusted").
        """
        system = current_system()
        client_entry: dict[str, object] = {"name": client, "key_file": str(self.client_keys[client])}
        if signing_key_file is not None:
            client_entry["signing_key_file"] = str(signing_key_file)
        inventory = {
            **({"trust": trust} if trust else {}),
            "client": client_entry,
            "builders": [
                {
                    "name": b.name,
                    "host_name": b.address,
                    "address": b.address,
                    "port": 22,
                    "protocol": "ssh-ng",
                    "ssh_user": BUILDER_USER,
                    "systems": [system],
                    "features": [],
                    "mandatory_features": [],
                    "host_key": b.host_key,
                    "max_jobs": max_jobs,
                    "speed_factor": 1,
                }
                for b in builders
            ],
        }
        path = self.root / "clients" / client / "inventory.json"
        path.write_text(json.dumps(inventory, indent=2))
        return path

    def start_agent(self, b: Builder, *args: str) -> int:
        """Start `nixfarm agent` in the builder as root; returns its PID (host view)."""
        log = (b.root / "agent.log").open("ab")
        argv = [b.nixfarm, "--config", str(b.root / "agent.json"), "agent", *args]
        nsenter = subprocess.Popen(
            [*b.nsenter(), *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        sock = b.root / "state" / "control.sock"
        deadline = time.monotonic() + 30
        while not sock.exists():
            if nsenter.poll() is not None or time.monotonic() > deadline:
                raise FarmError(
                    f"agent on {b.name} did not start: {(b.root / 'agent.log').read_text()[-2000:]}"
                )
            time.sleep(0.02)
        pid = self._child_of(nsenter.pid)
        b.agents[pid] = nsenter
        return pid

    def stop_agent(self, b: Builder, pid: int) -> int:
        """SIGTERM the agent (if still running) and wait; returns its exit status."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        try:
            return b.agents.pop(pid).wait(timeout=30)  # nsenter exits with the agent's status
        except subprocess.TimeoutExpired:
            raise FarmError(f"agent {pid} on {b.name} did not stop within 30 s") from None

    def restart_sshd(self, b: Builder) -> None:
        """Start the builder's sshd again (after a test killed it)."""
        b.exec([program("sshd"), "-f", str(b.root / "sshd_config"), "-E", str(b.root / "sshd.log")])

    # -- teardown ----------------------------------------------------------

    def stop_builder(self, b: Builder) -> None:
        """Kill everything in the builder and remove its network and cgroup."""
        if b.unshare is not None and b.unshare.poll() is None:
            # --kill-child: unshare's death SIGKILLs our init, which ends the PID namespace.
            os.killpg(b.unshare.pid, signal.SIGKILL)
            b.unshare.wait(timeout=10)
        if b.init_pid:
            self._wait_gone(b.init_pid)
        with contextlib.suppress(Exception):
            netns.remove(b.netns)
        with IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=b.host_veth):
                with contextlib.suppress(Exception):
                    ipr.link("del", index=idx)
        if b.cgroup:
            self._remove_cgroup(b.cgroup)

    @staticmethod
    def _wait_gone(pid: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.02)

    @staticmethod
    def _remove_cgroup(path: str) -> None:
        deadline = time.monotonic() + 10
        while os.path.isdir(path):
            try:
                os.rmdir(path)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # its last processes are still exiting

    def close(self) -> None:
        """Stop every builder and delete the farm directory; safe to call twice.

        A no-op in any other process than the one that made the farm: a helper
        pyroute2 forked (NetNS) that is stopped with SIGTERM while a signal
        handler of ours turns that into an exception unwinds through copies of
        our frames, and once deleted the farm under the running demo (seen).
        """
        if os.getpid() != self._owner:
            return
        errors = []
        for b in self.builders.values():
            try:
                self.stop_builder(b)
            except Exception as e:  # keep tearing down the others
                errors.append(f"{b.name}: {e}")
        self.builders.clear()
        shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise FarmError("teardown incomplete: " + "; ".join(errors))


def leftovers(farm_id: str) -> list[str]:
    """Anything of farm `farm_id` still on the machine: netns, links, cgroups, processes, dirs."""
    found = [f"netns {n}" for n in netns.listnetns() if n.startswith(f"{PREFIX}{farm_id}")]
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name.startswith(f"{PREFIX}{farm_id}"):
                found.append(f"link {name}")
    for base in (f"{CGROUP_ROOT}/memory", CGROUP_ROOT):
        if os.path.isdir(base):
            found += [f"cgroup {base}/{d}" for d in os.listdir(base) if d.startswith(f"{PREFIX}{farm_id}")]
    marker = f"nixfarm-test-{farm_id}"
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in entry.joinpath("cmdline").read_bytes().decode(errors="replace"):
                    found.append(f"process {entry.name}")
    if Path(f"/run/{marker}").exists():
        found.append(f"directory /run/{marker}")
    return found


def gateways_and_waiters(builder: Builder) -> tuple[int, int]:
    """The builder's stream processes: Python gateways, and the `cat`s waiting for the agent.
    (Not the login shell that runs the forced command, which this sshd keeps.)"""
    commands = [cmd for _, cmd in builder.processes()]
    gateways = sum("nixfarm gateway" in c and not c.startswith("sh -c") for c in commands)
    return gateways, sum(c.strip() == "cat" for c in commands)
