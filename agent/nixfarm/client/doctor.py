"""`nixfarm doctor`: check every builder of the inventory the way nix-daemon will reach it.

Run as root on a client. For each builder, in order (a check marked * stops
that builder's checks when it fails, as the later ones cannot run):

  resolve *   the name Nix's ssh connects to (the machines file names the
              builder by host_name; ssh_config may map it to an address),
              and the inventory's address, resolve
  ssh-sharing where ssh_config shares one connection per builder
              (ControlMaster, the client module's connectionSharing), its
              socket directory exists and is root's alone
  tcp *       address:port accepts a connection and answers with an SSH banner
  host-key *  the key the builder presents is the one the inventory pins
  key-file *  the client key exists, is root's, mode 0600 or narrower (else
              OpenSSH ignores it), and is a private key without a passphrase
  login *     the builder accepts that key for ssh_user
  metrics     the gateway answers `nixfarm metrics --json` with a schema 1 snapshot
  build-role  the gateway lets this key run `nix-daemon --stdio`
  daemon      a real ssh-ng handshake with the builder's Nix daemon (and, for
              ssh:// builders, with `nix-store --serve --write`)
  trust       in the farm's untrusted mode (inventory "trust"), the daemon does
              not trust ssh_user, runs Nix >= 2.16 and is reached over ssh-ng;
              in trusted mode it trusts ssh_user (else it refuses client
              builds), a warning: a trusted Nix user is as good as root
  signing-key untrusted mode: the client's Nix signing key (client.signing_key_file)
              is set, root's alone and a Nix secret key (its public key shown)
  unsigned-paths  untrusted mode: how many paths of the local store have no
              signature and no content address (untrusted builders refuse them
              as inputs; `nixfarm sign-store` signs them)
  systems     the builder builds for every system the inventory sends it
  features    the builder offers every feature the inventory claims for it
  clock       the builder's clock is close to this client's

Each check ends "ok", "warn" or "FAIL" (with the fix). A builder with any
FAIL is unusable: Nix's builds there would fail. Exit code 1 if any builder
is unusable, else 0. Every network step has a timeout, and whatever a
builder sends is read with a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import asyncssh

from ..common import store
from ..common.errors import NixfarmError
from ..common.snapshot import BadSnapshot, validate
from . import nixproto, signing
from .inventory import Builder, Inventory, load_inventory
from .sshconn import MAX_STDERR, connect_options, pinned_known_hosts, read_bounded, run_for_line

DEFAULT_INVENTORY = "/etc/nixfarm/inventory.json"
OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
CHECKS = (
    "resolve",
    "ssh-sharing",
    "tcp",
    "host-key",
    "key-file",
    "login",
    "metrics",
    "build-role",
    "daemon",
    "trust",
    "signing-key",
    "unsigned-paths",
    "systems",
    "features",
    "clock",
)
MAX_SNAPSHOT = 1 << 20
MAX_KEY_FILE = 64 << 10
CLOCK_WARN, CLOCK_FAIL = 5.0, 60.0
# NixOS/nix#3921: from 2.16 on, Nix builds input-addressed derivations for untrusted users.
UNTRUSTED_NIX = (2, 16)
TRUST_OPTION = signing.TRUST_OPTION
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Timeouts:
    """Seconds each network step may take."""

    def __init__(
        self,
        resolve: float = 5.0,
        tcp: float = 5.0,
        ssh: float = 10.0,
        command: float = 20.0,
        handshake: float = 15.0,
    ) -> None:
        self.resolve = resolve
        self.tcp = tcp
        self.ssh = ssh
        self.command = command
        self.handshake = handshake


@dataclass
class Check:
    """The outcome of one check of one builder."""

    name: str
    status: str  # ok | warn | fail | skip
    message: str
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        """The check as --json prints it."""
        return {"check": self.name, "status": self.status, "message": self.message, "fix": self.fix or None}


@dataclass
class Report:
    """Every check of one builder."""

    builder: Builder
    checks: list[Check]

    @property
    def usable(self) -> bool:
        """No check failed: Nix's builds there should work."""
        return all(c.status != FAIL for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        """The builder as --json prints it."""
        b = self.builder
        return {
            "name": b.name,
            "host_name": b.host_name,
            "address": b.address,
            "port": b.port,
            "protocol": b.protocol,
            "usable": self.usable,
            "checks": [c.to_json() for c in self.checks],
        }


class _Stop(Exception):
    """A check failed in a way that stops this builder's later checks."""


@dataclass
class KeyFile:
    """The client key, checked once for every builder."""

    check: Check
    usable: bool  # asyncssh could load it: the SSH checks can run
    public_key: str  # "ssh-ed25519 AAAA..." or "" if unreadable


def check_key_file(path: str) -> KeyFile:
    """key-file: present, root's, mode <= 0600, a private key that loads without a passphrase."""
    try:
        st = os.stat(path)
    except OSError as e:
        fix = (
            f"create it: ssh-keygen -t ed25519 -N '' -f {path}; then authorize its public key on the "
            "builders (services.nixfarm.farm.clients.<this client>.publicKey)"
        )
        return KeyFile(Check("key-file", FAIL, f"{path}: {e.strerror}", fix), False, "")
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_KEY_FILE:
        return KeyFile(
            Check("key-file", FAIL, f"{path} is not a private key file", "point client.key_file at one"),
            False,
            "",
        )
    try:
        key = asyncssh.read_private_key(path)
    except (asyncssh.KeyImportError, OSError, ValueError) as e:
        text = str(e)
        if "passphrase" in text.lower():
            return KeyFile(
                Check(
                    "key-file",
                    FAIL,
                    f"{path} is encrypted with a passphrase: nix-daemon's ssh cannot type it",
                    f"remove the passphrase: ssh-keygen -p -N '' -f {path}",
                ),
                False,
                "",
            )
        return KeyFile(
            Check("key-file", FAIL, f"{path} is not a private key OpenSSH can use: {text[:200]}", ""),
            False,
            "",
        )
    public = key.export_public_key().decode().split()
    public_key = " ".join(public[:2])
    what = f"{public[0]} {key.get_fingerprint()}"
    problems, fixes = [], []
    if st.st_uid != 0:
        problems.append(f"owned by uid {st.st_uid}, not root")
        fixes.append(f"chown root:root {path}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o177:
        problems.append(
            f"mode {mode:04o}: OpenSSH ignores a private key others can read "
            "('UNPROTECTED PRIVATE KEY FILE'), so nix-daemon's ssh would have no key"
        )
        fixes.append(f"chmod 600 {path}")
    if problems:
        return KeyFile(
            Check("key-file", FAIL, f"{path} ({what}): {'; '.join(problems)}", "; ".join(fixes)),
            True,
            public_key,
        )
    return KeyFile(Check("key-file", OK, f"{path}: {what}, root's, mode {mode:04o}"), True, public_key)


def check_signing(inventory: Inventory, db_path: str = store.DB_PATH) -> list[Check]:
    """signing-key and unsigned-paths: this client's side of the untrusted mode (checked once)."""
    if inventory.trust != "untrusted":
        why = "not needed: the farm is in trusted mode, where builders accept this client's paths unsigned"
        return [Check("signing-key", SKIP, why), Check("unsigned-paths", SKIP, why)]
    return [_signing_key(inventory), _unsigned_paths(db_path)]


def _signing_key(inventory: Inventory) -> Check:
    path = inventory.signing_key_file
    if not path:
        return Check(
            "signing-key",
            WARN,
            "the farm does not trust its clients, but this client has no signing key "
            "(client.signing_key_file): builders refuse every input it built itself "
            "('lacks a signature by a trusted key')",
            f"set {signing.KEY_OPTION} (the client module does in untrusted mode; an inventory without it "
            "comes from an older nixfarm: rebuild this client)",
        )
    try:
        key = signing.read_signing_key(path)
    except signing.SigningKeyError as e:
        return Check(
            "signing-key",
            FAIL,
            f"{e}: Nix signs every path it builds with it (secret-key-files), so its builds fail",
            "systemctl restart nixfarm-signing-key (it makes a missing key), or point "
            f"{signing.KEY_OPTION} at a key from nix-store --generate-binary-cache-key",
        )
    if key.uid != 0 or key.mode & 0o077:
        return Check(
            "signing-key",
            FAIL,
            f"{path} (public key {key.public_key}) is not root's alone (uid {key.uid}, mode {key.mode:04o}): "
            "whoever reads it can sign store paths that every untrusted builder accepts",
            f"chown root {path} && chmod 600 {path}",
        )
    return Check(
        "signing-key",
        OK,
        f"{path}: {key.public_key}, root's, mode {key.mode:04o} (the builders must list it: "
        f"services.nixfarm.farm.clients.{inventory.client_name}.signingKey)",
    )


def _unsigned_paths(db_path: str) -> Check:
    try:
        count = signing.count_unsigned(db_path)
    except NixfarmError as e:
        return Check("unsigned-paths", WARN, f"could not count them: {e}", "run doctor as root")
    if count == 0:
        return Check("unsigned-paths", OK, "every path of the local store is signed or content-addressed")
    return Check(
        "unsigned-paths",
        WARN,
        f"{count} paths are unsigned: a build that needs one of them as an input will fail on untrusted "
        "builders ('lacks a signature by a trusted key')",
        "nixfarm sign-store",
    )


def nix_version_tuple(text: str | None) -> tuple[int, int] | None:
    """(2, 26) for "2.26.3"; None if there is no version to read."""
    match = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


async def getaddrinfo(host: str, port: int, timeout: float) -> list[str]:
    """The addresses `host` resolves to, in a daemon thread so a hung resolver cannot hold us.

    (asyncio's own getaddrinfo runs in the default executor, whose threads
    asyncio.run() waits for at exit.)
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[list[str]] = loop.create_future()

    def settle(result: list[str] | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result or [])

    def work() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            result = list(dict.fromkeys(str(info[4][0]) for info in infos))
            args: tuple[list[str] | None, BaseException | None] = (result, None)
        except (OSError, UnicodeError) as e:
            args = (None, e)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, *args)

    threading.Thread(target=work, name=f"resolve {host}", daemon=True).start()
    return await asyncio.wait_for(future, timeout)


async def ssh_settings(host_name: str, timeout: float) -> dict[str, str] | str:
    """What `ssh host_name` would use (`ssh -G`: hostname, port, controlmaster, ...), with at
    least a hostname and a numeric port; or why we cannot tell."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "ssh",
            "-G",
            "--",
            host_name,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        return "there is no ssh (OpenSSH client) in PATH"
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return f"ssh -G {host_name} did not answer within {timeout:g} s"
    if proc.returncode != 0:
        return f"ssh -G {host_name} failed: {_last_line(err)}"
    fields = dict(line.partition(" ")[::2] for line in out.decode(errors="replace").splitlines())
    if not fields.get("hostname") or not fields.get("port", "").isdigit():
        return f"ssh -G {host_name} printed no hostname and port"
    return fields


def _clean(text: str, limit: int = 300) -> str:
    """Text from a builder, safe to print: no colours (Nix's errors have them), no control characters."""
    text = _ANSI.sub("", text[: limit * 2])[:limit]
    return "".join(c if c.isprintable() else "?" for c in text)


def _last_line(data: bytes) -> str:
    lines = data.decode("utf-8", errors="replace").strip().splitlines()
    return _clean(lines[-1]) if lines else "(no message)"


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno).lower()
    text = str(e).strip() or type(e).__name__
    return _clean(text.splitlines()[0])


class BuilderDoctor:
    """Runs the checks of one builder."""

    def __init__(
        self,
        inventory: Inventory,
        builder: Builder,
        key: KeyFile,
        timeouts: Timeouts,
        client_checks: list[Check] | None = None,
    ) -> None:
        self.inventory = inventory
        self.b = builder
        self.key = key
        self.t = timeouts
        # This client's own checks (check_signing): the same for every builder, never skipped.
        self.checks: list[Check] = list(client_checks or [])
        self.stopped_by = ""

    def add(self, name: str, status: str, message: str, fix: str = "") -> None:
        """Record one check."""
        self.checks.append(Check(name, status, message, fix))

    def stop(self, name: str, message: str, fix: str) -> None:
        """Record a failure the later checks cannot get past."""
        self.add(name, FAIL, message, fix)
        self.stopped_by = name
        raise _Stop

    async def run(self) -> Report:
        """Every check, in order; the skipped ones say why."""
        try:
            await self.resolve()
            await self.tcp()
            await self.host_key()
            self.checks.append(self.key.check)
            if not self.key.usable:
                self.stopped_by = "key-file"
                raise _Stop
            conn = await self.login()
            async with conn:
                snapshot, t0, t1 = await self.metrics(conn)
                await self.daemon(conn)
            self.systems_and_features(snapshot)
            self.clock(snapshot, t0, t1)
        except _Stop:
            pass
        except Exception as e:  # a bug, or a builder stranger than we planned for: report, never crash
            done = {c.name for c in self.checks}
            current = next((n for n in CHECKS if n not in done), "doctor")
            self.add(current, FAIL, f"unexpected {type(e).__name__}: {_describe(e)}", "report this as a bug")
        done = {c.name for c in self.checks}
        for name in CHECKS:
            if name not in done:
                self.add(
                    name, SKIP, f"not checked: {self.stopped_by} failed" if self.stopped_by else "not checked"
                )
        order = {name: i for i, name in enumerate(CHECKS)}
        self.checks.sort(key=lambda c: order.get(c.name, len(order)))
        return Report(self.b, self.checks)

    # -- network -------------------------------------------------------------

    async def resolve(self) -> None:
        """resolve: the name Nix's ssh uses, and the inventory's address."""
        b = self.b
        settings = await ssh_settings(b.host_name, self.t.resolve)
        ssh_problem = settings if isinstance(settings, str) else ""
        if isinstance(settings, str):
            ssh_host, ssh_port = b.host_name, b.port
        else:
            ssh_host, ssh_port = settings["hostname"], int(settings["port"])
        nix_ips, nix_error = await self._resolve(ssh_host, ssh_port)
        if b.address == ssh_host:
            addr_ips, addr_error = nix_ips, nix_error
        else:
            addr_ips, addr_error = await self._resolve(b.address, b.port)
        where = f"{ssh_host!r}" + (
            f" (ssh_config maps {b.host_name!r} to it)" if ssh_host != b.host_name else ""
        )
        fix_name = (
            f"make {ssh_host!r} resolve on this client (DNS, or /etc/hosts: networking.hosts on NixOS), "
            f"or give the builder an address (services.nixfarm.farm.builders.{b.name}.address), which the "
            "client module maps to its host name in ssh_config"
        )
        if addr_error:
            self.stop(
                "resolve",
                f"the inventory's address {b.address!r} does not resolve: {addr_error}"
                + (
                    f"; Nix's ssh connects to {where}: {nix_error or 'resolves'}"
                    if b.address != ssh_host
                    else ""
                ),
                fix_name
                if b.address == ssh_host
                else f"set builders.{b.name}.address to a name or IP that resolves",
            )
        if nix_error:
            self.add(
                "resolve",
                FAIL,
                f"Nix's ssh connects to {where}, which does not resolve: {nix_error} "
                f"(the inventory's address {b.address} does: checking on with it)",
                fix_name,
            )
        elif ssh_problem:
            self.add(
                "resolve",
                FAIL,
                f"{ssh_problem}: nix-daemon runs ssh to reach {b.protocol}:// builders",
                "install the OpenSSH client (on NixOS programs.ssh is there by default)",
            )
        elif not set(nix_ips) & set(addr_ips) or ssh_port != b.port:
            self.add(
                "resolve",
                WARN,
                f"Nix's ssh reaches {ssh_host}:{ssh_port} ({', '.join(nix_ips)}) but the inventory says "
                f"{b.address}:{b.port} ({', '.join(addr_ips)}), which the dispatcher and these checks use",
                f"make them agree: a 'Host {b.host_name}' block with HostName {b.address} and Port {b.port} "
                "in ssh_config (the NixOS client module writes it)",
            )
        else:
            mapped = f" via ssh_config HostName {ssh_host}" if ssh_host != b.host_name else ""
            self.add("resolve", OK, f"{b.host_name}{mapped} -> {', '.join(nix_ips)}, port {ssh_port}")
        if not isinstance(settings, str):
            self.ssh_sharing(settings)

    def ssh_sharing(self, settings: dict[str, str]) -> None:
        """ssh-sharing: a shared connection's socket directory exists and is root's alone.

        Where it is missing, ssh exits ("unix_listener: cannot bind") before any
        session, and every build sent here fails; where others may write it,
        whoever opens a socket there runs builds with this client's key.
        """
        master, path = settings.get("controlmaster", "false"), settings.get("controlpath", "none")
        if master in ("false", "no") or path in ("", "none"):
            self.add("ssh-sharing", OK, "off: every build opens its own SSH connection")
            return
        directory = os.path.dirname(path) or "."
        shared = f"ssh_config shares connections (ControlMaster {master}) with sockets in {directory}"
        fix = (
            f"systemd-tmpfiles --create (the NixOS client module's rule makes it), "
            f"or: install -d -m 0700 -o root {directory}"
        )
        try:
            st = os.stat(directory)
        except OSError as e:
            problem = (e.strerror or str(e)).lower()
            self.add("ssh-sharing", FAIL, f"{shared}: {problem}, so ssh exits: every build here fails", fix)
            return
        if not stat.S_ISDIR(st.st_mode):
            self.add("ssh-sharing", FAIL, f"{shared}, which is not a directory: every build here fails", fix)
        elif st.st_uid != os.geteuid() or st.st_mode & 0o022:
            self.add(
                "ssh-sharing",
                FAIL,
                f"{shared}, which others may write (owner uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):04o}): a socket put there runs builds with this client's key",
                f"chown root {directory} && chmod 0700 {directory}",
            )
        else:
            persist = settings.get("controlpersist", "no")
            kept = f", kept {persist} s after the last build" if persist.isdigit() else ""
            self.add("ssh-sharing", OK, f"one connection per builder{kept}, sockets in {directory}")

    async def _resolve(self, host: str, port: int) -> tuple[list[str], str]:
        try:
            return await getaddrinfo(host, port, self.t.resolve), ""
        except socket.gaierror as e:
            return [], e.strerror or str(e)
        except (OSError, UnicodeError) as e:
            return [], _describe(e)
        except TimeoutError:
            return [], f"no answer from the resolver within {self.t.resolve:g} s"

    async def tcp(self) -> None:
        """tcp: address:port accepts a connection and speaks SSH."""
        b = self.b
        where = f"{b.address}:{b.port}"
        start = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(b.address, b.port), self.t.tcp)
        except ConnectionRefusedError:
            self.stop(
                "tcp",
                f"{where}: connection refused: no sshd listens there",
                f"start sshd on {b.name} (services.openssh.enable; systemctl start sshd) "
                f"and check that it listens on port {b.port}",
            )
        except (TimeoutError, OSError) as e:
            self.stop(
                "tcp",
                f"{where}: {_describe(e)} after {time.monotonic() - start:.1f} s",
                f"check that {b.name} is up and its network link works, and that no firewall drops "
                f"port {b.port} from this client (networking.firewall.allowedTCPPorts on NixOS)",
            )
        elapsed = (time.monotonic() - start) * 1000
        try:
            banner = await asyncio.wait_for(reader.read(256), self.t.tcp)
        except (TimeoutError, OSError) as e:
            banner, error = b"", _describe(e)
        else:
            error = "" if banner else "closed the connection"
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1)
        first = _clean(banner.split(b"\n", 1)[0].decode("ascii", errors="replace").strip(), 80)
        if not first.startswith("SSH-"):
            self.stop(
                "tcp",
                f"{where} accepts connections but sends no SSH banner ({error or repr(first[:80])})",
                f"check that {b.name} is up and the route to {b.address} reaches it (a proxy or firewall "
                f"in between may accept for it), and what listens on its port {b.port} "
                "(an overloaded sshd: MaxStartups)",
            )
        self.add("tcp", OK, f"{where} answers in {elapsed:.1f} ms: {first[:80]}")

    async def host_key(self) -> None:
        """host-key: the key exchange succeeds with only the pinned key trusted."""
        b = self.b
        pinned = asyncssh.import_public_key(b.host_key)
        pinned_text = f"{pinned.get_algorithm()} {pinned.get_fingerprint()}"
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(
                    b.address,
                    b.port,
                    username=b.ssh_user,
                    known_hosts=pinned_known_hosts(b),
                    client_keys=None,
                    agent_path=None,
                    config=None,
                    public_key_auth=False,
                    password_auth=False,
                    kbdint_auth=False,
                    host_based_auth=False,
                    gss_auth=False,
                    gss_kex=False,
                    connect_timeout=self.t.ssh,
                ),
                self.t.ssh + 1,
            )
            conn.close()  # the builder let us in without a key: not our business here
        except asyncssh.HostKeyNotVerifiable:
            await self._host_key_mismatch(pinned, pinned_text)
        except asyncssh.PermissionDenied:
            pass  # the key exchange succeeded: the host key is the pinned one
        except (asyncssh.Error, OSError, TimeoutError) as e:
            self.stop(
                "host-key",
                f"SSH key exchange with {b.address}:{b.port} failed: {_describe(e)}",
                f"check sshd on {b.name} (its log says why); "
                f"it must offer a {pinned.get_algorithm()} host key",
            )
        self.add("host-key", OK, f"the builder presents the pinned key {pinned_text}")

    async def _host_key_mismatch(self, pinned: asyncssh.SSHKey, pinned_text: str) -> None:
        b = self.b
        actual = await self._server_key([a.decode() for a in pinned.sig_algorithms])
        actual = actual or await self._server_key(None)
        if actual is None:
            shown = "a key we could not fetch"
            line = "<the builder's /etc/ssh/ssh_host_ed25519_key.pub>"
        else:
            shown = f"{actual.get_algorithm()} {actual.get_fingerprint()}"
            line = " ".join(actual.export_public_key().decode().split()[:2])
        self.stop(
            "host-key",
            f"HOST KEY MISMATCH: {b.address}:{b.port} presents {shown}, the inventory pins {pinned_text}; "
            "nix-daemon's ssh refuses to connect (host key verification failed)",
            f"if {b.name} was reinstalled or its host key changed, check the fingerprint on its console "
            f"(ssh-keygen -lf /etc/ssh/ssh_host_{pinned.get_algorithm().removeprefix('ssh-')}_key.pub) "
            "and set "
            f'services.nixfarm.farm.builders.{b.name}.hostKey = "{line}"; '
            f"if not, do not use it: something else answers at {b.address}",
        )

    async def _server_key(self, algs: list[str] | None) -> asyncssh.SSHKey | None:
        """The host key the builder presents (of one of `algs`, if given), or None."""
        kwargs: dict[str, Any] = {"server_host_key_algs": algs} if algs else {}
        try:
            return await asyncio.wait_for(
                asyncssh.get_server_host_key(self.b.address, self.b.port, config=None, **kwargs), self.t.ssh
            )
        except (asyncssh.Error, OSError, TimeoutError, ValueError):
            return None

    async def login(self) -> asyncssh.SSHClientConnection:
        """login: the builder accepts the client key for ssh_user."""
        b, inv = self.b, self.inventory
        options = connect_options(inv.key_file, b, connect_timeout=self.t.ssh)
        try:
            conn = await asyncio.wait_for(asyncssh.connect(**options), self.t.ssh + 1)
        except asyncssh.PermissionDenied:
            self.stop(
                "login",
                f"{b.ssh_user}@{b.address} refused this client's key ({self.key.public_key[:40]}...)",
                f"authorize it on {b.name}: services.nixfarm.farm.clients.{inv.client_name}.publicKey = "
                f'"{self.key.public_key}" and rebuild the builder (by hand: a line '
                f'restrict,command="nixfarm gateway --client {inv.client_name} --role build" <key> in '
                f"{b.ssh_user}'s authorized_keys)",
            )
        except (asyncssh.Error, OSError, TimeoutError) as e:
            self.stop(
                "login", f"SSH login as {b.ssh_user} failed: {_describe(e)}", f"see sshd's log on {b.name}"
            )
        self.add("login", OK, f"logged in as {b.ssh_user} with the client key")
        return conn

    # -- through the gateway -------------------------------------------------------

    async def metrics(self, conn: asyncssh.SSHClientConnection) -> tuple[dict[str, Any] | None, float, float]:
        """metrics: `nixfarm metrics --json` answers a schema 1 snapshot; returns it and when we asked."""
        b = self.b
        t0 = time.time()
        try:
            answer = await run_for_line(conn, "nixfarm metrics --json", MAX_SNAPSHOT, self.t.command)
        except (asyncssh.Error, OSError, TimeoutError) as e:
            self.add(
                "metrics", WARN, f"nixfarm metrics: {_describe(e)}", f"see the gateway's log on {b.name}"
            )
            return None, t0, time.time()
        t1 = time.time()
        degraded = "the dispatcher lists it as degraded (static maxJobs), builds still work"
        if answer.how == "eof" and answer.status != 0:
            text = _last_line(answer.stderr)
            if "nixfarm gateway: refused" in text:
                fix = f"update nixfarm on {b.name}: its gateway refuses what this client asks"
            elif "not found" in text or answer.status == 127:
                fix = (
                    f"this key is not forced through nixfarm gateway on {b.name} (it may run any command): "
                    'use restrict,command="nixfarm gateway '
                    f'--client {self.inventory.client_name} --role build"'
                )
            else:
                fix = f"see the gateway's log on {b.name}"
            self.add("metrics", WARN, f"nixfarm metrics exited {answer.status}: {text}; {degraded}", fix)
            return None, t0, t1
        if answer.how == "too long":
            self.add("metrics", WARN, f"a snapshot line longer than {MAX_SNAPSHOT} bytes; {degraded}", "")
            return None, t0, t1
        try:
            snapshot = validate(answer.line.strip())
        except BadSnapshot as e:
            self.add(
                "metrics",
                WARN,
                f"not a usable snapshot: {e}; {degraded}",
                f"run the same nixfarm version on {b.name} and this client",
            )
            return None, t0, t1
        host = _clean(str(snapshot.get("hostname")), 64)
        agent = _clean(str(snapshot.get("agent_version")), 32)
        self.add("metrics", OK, f"schema 1 snapshot from {host} (nixfarm {agent})")
        return snapshot, t0, t1

    async def daemon(self, conn: asyncssh.SSHClientConnection) -> None:
        """build-role, daemon, trust: an ssh-ng handshake through the gateway, as Nix does it."""
        b = self.b
        try:
            proc = await asyncio.wait_for(
                conn.create_process("nix-daemon --stdio", encoding=None), self.t.ssh
            )
        except (asyncssh.Error, OSError, TimeoutError) as e:
            self.add(
                "build-role",
                FAIL,
                f"could not start a session: {_describe(e)}",
                f"see sshd's log on {b.name}",
            )
            return
        try:
            try:
                hello = await asyncio.wait_for(
                    nixproto.handshake(proc.stdout.readexactly, proc.stdin.write), self.t.handshake
                )
            except (nixproto.ProtocolError, asyncssh.Error, OSError, TimeoutError) as e:
                await self._handshake_failed(proc, e)
                failed = "build-role" if self.checks[-1].name == "build-role" else "daemon"
                for name in ("daemon", "trust"):
                    if name not in {c.name for c in self.checks}:
                        self.add(name, SKIP, f"not checked: {failed} failed")
                return
            self.add("build-role", OK, "the gateway lets this key run nix-daemon --stdio")
            nix = f" (Nix {_clean(hello.nix_version, 40)})" if hello.nix_version else ""
            message = f"ssh-ng handshake: daemon protocol {nixproto.version_text(hello.daemon_version)}{nix}"
            if hello.version != hello.daemon_version:
                message += f", spoken at {nixproto.version_text(hello.version)}"
            serve_error = await self._serve(conn) if b.protocol == "ssh" else ""
            if serve_error:
                self.add(
                    "daemon",
                    FAIL,
                    f"{message}, but nix-store --serve --write (ssh://) did not answer: {serve_error}",
                    f"check Nix on {b.name}, or use protocol ssh-ng",
                )
            else:
                serve = "; nix-store --serve --write answers too" if b.protocol == "ssh" else ""
                self.add("daemon", OK, message + serve)
            await self.trust(proc, hello)
        finally:
            with contextlib.suppress(OSError, asyncssh.Error):
                proc.stdin.write_eof()
            proc.close()

    async def _handshake_failed(self, proc: asyncssh.SSHClientProcess[bytes], error: BaseException) -> None:
        b, client = self.b, self.inventory.client_name
        with contextlib.suppress(OSError, asyncssh.Error):
            proc.stdin.write_eof()
        try:
            err, _ = await asyncio.wait_for(read_bounded(proc.stderr, MAX_STDERR), 3)
        except (TimeoutError, asyncssh.Error, OSError):
            err = b""
        text = _last_line(err) if err else ""
        if "needs the build role" in text:
            role = text.rsplit("this key has the ", 1)[-1].split()[0] if "this key has the " in text else "?"
            self.add(
                "build-role",
                FAIL,
                f"this key has the {role} role: the gateway refuses nix-daemon --stdio, "
                "so builds are refused",
                f'give it the build role on {b.name}: services.nixfarm.farm.clients.{client}.role = "build" '
                f"(the builder's authorizedClients), and rebuild the builder",
            )
            return
        if "refused" in text:
            self.add(
                "build-role",
                FAIL,
                f"the gateway refused nix-daemon --stdio: {text}",
                f"see {b.name}'s gateway log",
            )
            return
        self.add("build-role", OK, "the gateway did not refuse nix-daemon --stdio")
        detail = f"{_describe(error)}" + (f"; the builder said: {text}" if text else "")
        self.add(
            "daemon",
            FAIL,
            f"no ssh-ng handshake with the builder's Nix daemon: {detail}",
            f"check that nix-daemon runs on {b.name} and that {b.ssh_user} can reach it "
            "(nix store ping --store daemon as that user)",
        )

    async def _serve(self, conn: asyncssh.SSHClientConnection) -> str:
        """For ssh:// builders: why `nix-store --serve --write` fails its handshake, or ""."""
        try:
            proc = await asyncio.wait_for(
                conn.create_process("nix-store --serve --write", encoding=None), self.t.ssh
            )
        except (asyncssh.Error, OSError, TimeoutError) as e:
            return _describe(e)
        try:
            read, write = proc.stdout.readexactly, proc.stdin.write
            await asyncio.wait_for(nixproto.serve_handshake(read, write), self.t.handshake)
            return ""
        except (nixproto.ProtocolError, asyncssh.Error, OSError, TimeoutError) as e:
            return _describe(e)
        finally:
            proc.close()

    async def trust(self, proc: asyncssh.SSHClientProcess[bytes], hello: nixproto.DaemonHello) -> None:
        """trust: from the 1.35 handshake flag, else from how the daemon treats a restricted setting."""
        b = self.b
        how = f"daemon protocol {nixproto.version_text(hello.version)} handshake flag"
        trusted = hello.trusted
        if trusted is None:
            if nixproto.minor(hello.version) < 12:
                self.add(
                    "trust",
                    WARN,
                    f"unknown (daemon protocol {nixproto.version_text(hello.version)} can tell neither way)",
                    f"make sure {b.ssh_user} is in trusted-users on {b.name}",
                )
                return
            try:
                trusted, _ = await asyncio.wait_for(
                    nixproto.probe_trust(proc.stdout.readexactly, proc.stdin.write, hello), self.t.handshake
                )
            except (nixproto.ProtocolError, asyncssh.Error, OSError, TimeoutError) as e:
                self.add(
                    "trust", WARN, f"unknown: the daemon did not answer wopSetOptions: {_describe(e)}", ""
                )
                return
            how = (
                f"protocol {nixproto.version_text(hello.version)} has no trust flag; "
                "from the daemon's answer to a restricted setting"
            )
        if self.inventory.trust == "untrusted":
            self._trust_untrusted_mode(bool(trusted), how, hello)
            return
        if trusted:
            self.add(
                "trust",
                WARN,
                f"the builder's Nix daemon trusts {b.ssh_user} ({how}): builds work, but a trusted Nix "
                f"user is as good as root on {b.name}, and a stolen client key can plant unsigned store "
                "paths that every client's builds then use",
                f'{TRUST_OPTION} = "untrusted" with a signingKey for each client'
                + self._needs_newer_nix(hello),
            )
            return
        self.add(
            "trust",
            FAIL,
            f"the builder's Nix daemon does not trust {b.ssh_user} ({how}): "
            "it refuses builds sent by clients "
            "('you are not privileged to build input-addressed derivations') and unsigned paths",
            f"add {b.ssh_user} to trusted-users in {b.name}'s nix.conf and restart nix-daemon (the nixfarm "
            "builder module does this for services.nixfarm.builder.user)",
        )

    def _needs_newer_nix(self, hello: nixproto.DaemonHello) -> str:
        version = nix_version_tuple(hello.nix_version)
        if version is not None and version >= UNTRUSTED_NIX:
            return " (Nix 2.16 or later on builders and clients)"
        shown = f"Nix {_clean(hello.nix_version or '', 40)}" if hello.nix_version else "a Nix older than 2.4"
        return f" (needs Nix 2.16 or later; {self.b.name} runs {shown}: upgrade it first)"

    def _trust_untrusted_mode(self, trusted: bool, how: str, hello: nixproto.DaemonHello) -> None:
        """trust in untrusted mode: not trusted, a Nix that builds for untrusted users, ssh-ng."""
        b = self.b
        if trusted:
            self.add(
                "trust",
                WARN,
                f"the builder's Nix daemon still trusts {b.ssh_user} ({how}) though the farm does not "
                f"trust its clients ({TRUST_OPTION}): a stolen client key is as good as root on {b.name}",
                f'rebuild {b.name} with the farm\'s settings: {TRUST_OPTION} = "untrusted" keeps '
                f"{b.ssh_user} out of its trusted-users",
            )
            return
        version = nix_version_tuple(hello.nix_version)
        if version is None or version < UNTRUSTED_NIX:
            shown = (
                f"Nix {_clean(hello.nix_version or '', 40)}" if hello.nix_version else "a Nix older than 2.4"
            )
            self.add(
                "trust",
                FAIL,
                f"the builder's Nix daemon does not trust {b.ssh_user} and runs {shown}, which refuses "
                "builds from untrusted users ('you are not privileged to build input-addressed "
                "derivations'); Nix builds them from 2.16 on",
                f'upgrade Nix on {b.name} to 2.16 or later, or set {TRUST_OPTION} = "trusted"',
            )
            return
        if b.protocol == "ssh":
            self.add(
                "trust",
                FAIL,
                f"the builder's Nix daemon does not trust {b.ssh_user}, and this builder is reached over "
                "ssh:// (nix-store --serve), whose builds an untrusted user may not run ('you are not "
                "privileged to build input-addressed derivations')",
                f'use ssh-ng: services.nixfarm.farm.builders.{b.name}.protocol = "ssh-ng"',
            )
            return
        self.add(
            "trust",
            OK,
            f"the builder's Nix daemon does not trust {b.ssh_user} ({how}): a stolen client key cannot "
            "take root there, and inputs must be signed by a key it trusts",
        )

    # -- from the snapshot -------------------------------------------------------

    def systems_and_features(self, snap: dict[str, Any] | None) -> None:
        """systems, features: what the inventory sends here is what the builder offers."""
        b = self.b
        if snap is None:
            for name in ("systems", "features"):
                self.add(name, SKIP, "not checked: no snapshot from the builder")
            return
        offered = _words(snap.get("systems"))
        missing = [s for s in b.systems if s not in offered]
        if missing:
            self.add(
                "systems",
                FAIL,
                f"the inventory sends {', '.join(missing)} builds here but the builder builds for "
                f"{', '.join(sorted(offered)) or 'nothing'}: those builds would fail there",
                f"remove {', '.join(missing)} from services.nixfarm.farm.builders.{b.name}.systems, "
                "or let the builder build for them (extra-platforms; binfmt emulation for other CPUs)",
            )
        else:
            self.add(
                "systems", OK, f"{', '.join(b.systems)} (the builder builds for {', '.join(sorted(offered))})"
            )
        claimed = list(dict.fromkeys(b.features + b.mandatory_features))
        have = _words(snap.get("features"))
        lacking = [f for f in claimed if f not in have]
        if lacking:
            self.add(
                "features",
                FAIL,
                f"the inventory claims {', '.join(lacking)} but the builder does not offer "
                f"{'it' if len(lacking) == 1 else 'them'} (it offers {', '.join(sorted(have)) or 'none'}): "
                "builds that need them would fail there",
                f"remove {', '.join(lacking)} from builders.{b.name}.features/mandatoryFeatures, "
                "or add them to the builder's system-features "
                f"(rebuild {b.name} with the same farm inventory)",
            )
            return
        extra = sorted(have - set(claimed))
        also = f"; it also offers {', '.join(extra)}, which the inventory does not list" if extra else ""
        self.add("features", OK, f"{', '.join(claimed) or 'none claimed'}{also}")

    def clock(self, snap: dict[str, Any] | None, t0: float, t1: float) -> None:
        """clock: the snapshot's timestamp against ours (the midpoint of the request)."""
        stamp = (snap or {}).get("timestamp")
        if snap is None or not isinstance(stamp, int | float) or isinstance(stamp, bool):
            self.add("clock", SKIP, "not checked: no timestamp from the builder")
            return
        skew = float(stamp) - (t0 + t1) / 2
        error = (t1 - t0) / 2
        least = max(0.0, abs(skew) - error)
        direction = "ahead of" if skew > 0 else "behind"
        message = f"the builder's clock is {abs(skew):.1f} s {direction} this one (±{error:.1f} s)"
        why = (
            "Nix's protocols do not mind, but TLS certificates and signatures look not yet valid or "
            "expired on the builder (fetchers, substituters), build timestamps and logs do not line up"
        )
        fix = (
            "run NTP on both machines "
            "(services.timesyncd or services.chrony on NixOS; timedatectl set-ntp true)"
        )
        if least > CLOCK_FAIL:
            self.add("clock", FAIL, f"{message}: {why}", fix)
        elif least > CLOCK_WARN:
            self.add("clock", WARN, f"{message}: {why}", fix)
        else:
            self.add("clock", OK, message)


def _words(value: Any) -> set[str]:
    """A snapshot's list of names, ignoring anything that is not one."""
    if not isinstance(value, list):
        return set()
    return {v for v in value if isinstance(v, str) and len(v) < 256 and v.isprintable()}


async def diagnose(inventory: Inventory, timeouts: Timeouts | None = None) -> list[Report]:
    """Check every builder, concurrently; reports in inventory order."""
    key = check_key_file(inventory.key_file)
    client_checks = check_signing(inventory)
    doctors = [
        BuilderDoctor(inventory, b, key, timeouts or Timeouts(), client_checks) for b in inventory.builders
    ]
    return list(await asyncio.gather(*(d.run() for d in doctors)))


_LABEL = {OK: "ok", WARN: "warn", FAIL: "FAIL", SKIP: "skip"}


def render(reports: list[Report]) -> str:
    """The human-readable report: a line per check, the fix on failures and warnings."""
    lines = []
    for r in reports:
        b = r.builder
        lines.append(
            f"{b.name} ({b.protocol}://{b.ssh_user}@{b.host_name}): {'usable' if r.usable else 'UNUSABLE'}"
        )
        for c in r.checks:
            fix = f" -- fix: {c.fix}" if c.fix and c.status in (FAIL, WARN) else ""
            lines.append(f"  {_LABEL[c.status]:<5} {c.name:<14} {c.message}{fix}")
    bad = [r.builder.name for r in reports if not r.usable]
    if bad:
        lines.append(f"{len(bad)} of {len(reports)} builders unusable: {', '.join(bad)}")
    else:
        lines.append(f"all {len(reports)} builders usable")
    return "\n".join(lines) + "\n"


def run_doctor(inventory_path: str, as_json: bool, timeouts: Timeouts | None = None) -> int:
    """Entry point of `nixfarm doctor`: 0 if every builder is usable, else 1."""
    inventory = load_inventory(inventory_path)
    logging.getLogger("asyncssh").setLevel(logging.CRITICAL)  # failures are ours to report
    if os.geteuid() != 0 and not as_json:
        print(
            f"nixfarm doctor: note: running as uid {os.geteuid()}; nix-daemon reaches builders as root",
            file=sys.stderr,
        )
    reports = asyncio.run(diagnose(inventory, timeouts))
    if as_json:
        sys.stdout.write(json.dumps([r.to_json() for r in reports], indent=2) + "\n")
    else:
        sys.stdout.write(render(reports))
    return 0 if all(r.usable for r in reports) else 1
