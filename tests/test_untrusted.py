"""Builders that do not trust their clients (services.nixfarm.farm.trust = "untrusted"), on the
harness with Nix 2.26 on both ends: real sshd, gateway and nix-daemon.

- A client that signs what it builds gets its builds done on an untrusted builder, through
  the build hook and through the dispatcher; an unsigned input is refused, and so is an
  output another builder made unless the client signs what comes back; ssh:// cannot build
  for an untrusted user at all.
- A stolen build-role key that speaks the worker protocol itself (the gateway execs
  `nix-daemon --stdio` and cannot filter what flows through it) tries to set options only
  root should set, to plant an unsigned input-addressed path, and to delete the builder's
  store. On untrusted builders (Nix 2.26 and 2.8) each is refused or harmless and nothing
  it asked for runs as root. On a trusted builder the same key plants its path; on a
  trusted Nix 2.8 builder (trusted mode is what Nix before 2.16 allows) its post-build-hook
  and the build itself run as root: the risk that trusted mode is. (Nix 2.26's
  `nix-daemon --stdio` serves the session itself and keeps the client's settings to
  itself, trusted or not: there the options reach nothing.)
- A metrics-role key reaches none of it.

(The real Nix client does not pass its settings over ssh-ng: `nix-build --store ssh-ng://...
--option post-build-hook ...` had no effect even on the trusted Nix 2.8 builder. So the option
attack speaks the protocol with nixfarm's own nixproto, as an attacker holding the key would.)
"""

from __future__ import annotations

import asyncio
import pwd
import secrets
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import Client
from dispatcher import Dispatcher
from farm import BUILDER_USER, Builder, Farm
from nixfarm.client import nixproto

HOOK_RAN = "/nix/var/nixfarm-hook-ran"  # where the planted hook writes the uid it ran as
LACKS_SIGNATURE = "because it lacks a signature by a trusted key"
WOP_BUILD_PATHS = 9  # worker-protocol.hh: BuildPaths
# The settings a stolen key would like to choose: a program the daemon runs as root after every
# build, builds as root in no sandbox, another build hook.
ROOT_OPTIONS = ("post-build-hook", "build-users-group", "sandbox", "build-hook")


def store_uri(farm: Farm, client: str, b: Builder) -> str:
    """The builder as a Nix store the client's key reaches (through the gateway)."""
    return (
        f"ssh-ng://{BUILDER_USER}@{b.address}?ssh-key={farm.client_keys[client]}"
        f"&base64-ssh-public-host-key={b.host_key_b64}"
    )


def two_step(farm: Farm) -> tuple[Path, str]:
    """An expression with `dep`, built by the client, and `top`, built on a builder from it."""
    nonce = secrets.token_hex(4)
    expr = farm.root / f"two-step-{nonce}.nix"
    expr.write_text(
        textwrap.dedent(f"""\
        rec {{
          dep = derivation {{ name = "dep-{nonce}"; system = builtins.currentSystem; builder = "/bin/sh";
                             args = [ "-c" "echo made by the client > $out" ]; }};
          top = derivation {{
            name = "top-{nonce}"; system = builtins.currentSystem; builder = "/bin/sh";
            args = [ "-c" ''
              /bin/cat ${{dep}} > $out
              echo built on $(/bin/cat /proc/sys/kernel/hostname) >> $out
            '' ];
          }};
        }}
        """)
    )
    return expr, nonce


def build(
    client: Client, expr: Path, attr: str, builders: str | None = None
) -> subprocess.CompletedProcess[str]:
    """nix-build one attribute: locally, or (`builders`) only remotely."""
    argv = ["nix-build", str(expr), "-A", attr, "--no-out-link"]
    if builders is not None:
        argv += ["--max-jobs", "0", "--builders", builders]
    return client.run(argv)


def test_an_untrusted_builder_builds_what_a_signing_client_sends(farm: Farm) -> None:
    key = farm.add_client("alice")
    secret, public = farm.make_signing_key("alice-1")
    b = farm.add_builder(
        "u1", clients={"alice": "build"}, nix="2.26", trusted=False, trusted_public_keys=[public]
    )
    plain = Client(farm.root, nix="2.26", poll_interval=1)  # no secret-key-files yet
    signing = Client(farm.root, nix="2.26", poll_interval=1, signing_key=secret)

    info = plain.run(["nix", "store", "info", "--store", store_uri(farm, "alice", b)])
    assert info.returncode == 0, info.stderr
    assert "Trusted: 0" in info.stdout + info.stderr  # the builder does not trust alice's key

    # An input the client built before it had a key: the builder refuses it.
    expr, nonce = two_step(farm)
    dep = build(plain, expr, "dep")
    assert dep.returncode == 0, dep.stderr
    refused = build(plain, expr, "top", b.machines_line(key))
    assert refused.returncode != 0
    assert f"cannot add path '{dep.stdout.strip()}' {LACKS_SIGNATURE}" in refused.stderr
    assert f"top-{nonce}" not in b.exec(["ls", "/nix/store"]).stdout

    # nixfarm sign-store signs it (as the client module's command does); then the same build works.
    inventory = farm.write_inventory("alice", [b], trust="untrusted", signing_key_file=secret)
    signed = plain.run([plain.nixfarm, "sign-store", "--inventory", str(inventory)])
    assert signed.returncode == 0, signed.stderr
    assert "paths got a signature by alice-1" in signed.stdout
    top = build(plain, expr, "top", b.machines_line(key))
    assert top.returncode == 0, top.stderr
    assert plain.read(top.stdout.strip()) == "made by the client\nbuilt on u1\n"

    # A client with secret-key-files signs as it builds; through the dispatcher as well.
    dispatcher = Dispatcher(farm, [b], current_load=signing.current_load)
    try:
        dispatcher.wait("u1 listed", lambda: dispatcher.listed() == {"u1"})
        expr, _ = two_step(farm)
        dep = build(signing, expr, "dep")
        assert dep.returncode == 0, dep.stderr
        top = build(signing, expr, "top", f"@{dispatcher.machines}")
        assert top.returncode == 0, top.stderr
        assert signing.read(top.stdout.strip()) == "made by the client\nbuilt on u1\n"
        # The builder holds the client's input with the client's signature, not its own trust.
        sigs = b.exec(["nix", "path-info", "--json", dep.stdout.strip()]).stdout
        assert public.split(":")[0] + ":" in sigs
    finally:
        dispatcher.stop()

    # An output one builder made, needed as an input on another: it comes back to the client
    # unsigned (the builder has no key; the client's Nix signs only what it builds itself), so
    # the other untrusted builder refuses it, unless the client signs what its remote builds
    # return (a post-build-hook).
    other = farm.add_builder("u2", clients={"alice": "build"}, nix="2.26", trusted=False,
                             trusted_public_keys=[public])  # fmt: skip
    resigning = Client(farm.root, nix="2.26", poll_interval=1, signing_key=secret, sign_outputs=True)
    for client, works in ((signing, False), (resigning, True)):
        expr, _ = two_step(farm)
        dep = build(client, expr, "dep", b.machines_line(key))  # built on u1
        assert dep.returncode == 0, dep.stderr
        top = build(client, expr, "top", other.machines_line(key))  # needs it on u2
        if works:
            assert top.returncode == 0, top.stderr
            assert client.read(top.stdout.strip()) == "made by the client\nbuilt on u2\n"
        else:
            assert top.returncode != 0
            assert f"cannot add path '{dep.stdout.strip()}' {LACKS_SIGNATURE}" in top.stderr

    # ssh:// (nix-store --serve) sends the builder a bare derivation, which Nix builds only for a
    # trusted user, signed inputs or not: the untrusted mode needs ssh-ng.
    expr, _ = two_step(farm)
    assert build(signing, expr, "dep").returncode == 0
    legacy = build(signing, expr, "top", b.machines_line(key, "ssh"))
    assert legacy.returncode != 0
    assert "you are not privileged to build input-addressed derivations" in legacy.stderr


async def _daemon_session(argv: list[str], overrides: dict[str, str], drv: str) -> tuple[list[str], str]:
    """Speak the worker protocol to `nix-daemon --stdio` over `argv` (ssh through the gateway), as an
    attacker with the key can: set `overrides` (wopSetOptions), then build `drv` (wopBuildPaths).
    Returns the daemon's messages and its error ("" if the build succeeded)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdin is not None and proc.stdout is not None
    read, write = proc.stdout.readexactly, proc.stdin.write
    try:
        hello = await nixproto.handshake(read, write)
        write(nixproto.set_options_message(hello.version, overrides))
        messages = await nixproto.read_stderr(read, hello.version)
        # BuildPaths: one derived path ("drv!out", the legacy form every protocol >= 1.30 reads),
        # build mode normal.
        write(nixproto.u64(WOP_BUILD_PATHS) + nixproto.u64(1) + nixproto.nix_string(f"{drv}!out".encode())
              + nixproto.u64(0))  # fmt: skip
        try:
            messages += await nixproto.read_stderr(read, hello.version)
            assert await nixproto.read_u64(read) == 1
            error = ""
        except nixproto.DaemonError as e:
            error = str(e)
        return messages, error
    finally:
        proc.stdin.close()
        await proc.wait()


def daemon_session(
    farm: Farm, b: Builder, overrides: dict[str, str], drv: str, client_name: str = "alice"
) -> tuple[list[str], str]:
    """_daemon_session with `client_name`'s key through `b`'s gateway, in at most two minutes."""
    argv = [*farm.ssh_argv(client_name, b), "nix-daemon --stdio"]
    return asyncio.run(asyncio.wait_for(_daemon_session(argv, overrides, drv), 120))


def attack_expression(farm: Farm) -> Path:
    """`hook`: an input-addressed script that records who ran it (in the builder's /nix/var);
    `whoami`: a build that records the uid it ran as."""
    nonce = secrets.token_hex(4)
    expr = farm.root / f"attack-{nonce}.nix"
    expr.write_text(
        textwrap.dedent(f"""\
        {{
          hook = derivation {{
            name = "hook-{nonce}"; system = builtins.currentSystem; builder = "/bin/sh";
            args = [ "-c" ("printf '#!/bin/sh\\\\n/usr/bin/id -u > {HOOK_RAN}\\\\n' > $out; "
                           + "/bin/chmod +x $out") ];
          }};
          whoami = derivation {{
            name = "whoami-{nonce}"; system = builtins.currentSystem; builder = "/bin/sh";
            args = [ "-c" "/usr/bin/id -u > $out" ];
          }};
        }}
        """)
    )
    return expr


def test_a_stolen_build_key_against_untrusted_and_trusted_builders(farm: Farm) -> None:
    """Each builder once: untrusted and trusted, on Nix 2.26 and on Nix 2.8 (trusted mode is
    what Nix before 2.16 allows)."""
    farm.add_client("alice")
    _, public = farm.make_signing_key("alice-1")
    builders = {
        (nix, trusted): farm.add_builder(
            f"{'t' if trusted else 'u'}{nix.replace('.', '')}",
            clients={"alice": "build"},
            nix=nix,
            trusted=trusted,
            trusted_public_keys=[] if trusted else [public],
        )
        for nix in ("2.26", "2.8")
        for trusted in (False, True)
    }
    client = Client(farm.root, nix="2.26")  # the thief's own Nix: no signing key
    expr = attack_expression(farm)
    hook = build(client, expr, "hook").stdout.strip()  # unsigned, input-addressed
    assert hook.startswith("/nix/store/"), hook
    # The same script as a content-addressed path, which every builder accepts unsigned (it names
    # its own contents): on the untrusted builders the hook exists too, so only trust decides.
    script = farm.root / "hook.sh"
    script.write_text(client.read(hook))
    script.chmod(0o755)
    ca_hook = client.run(["nix-store", "--add", str(script)]).stdout.strip()
    assert ca_hook.startswith("/nix/store/"), ca_hook

    for (nix, trusted), b in builders.items():
        store = store_uri(farm, "alice", b)
        # (b) An unsigned input-addressed path, the client's own check turned off.
        copy = client.run(["nix", "copy", "--no-check-sigs", "--to", store, hook])
        if trusted:  # the risk: planted, for every client's builds to use
            assert copy.returncode == 0, copy.stderr
            assert Path(hook).name in b.exec(["ls", "/nix/store"]).stdout
        else:
            assert copy.returncode != 0
            why = LACKS_SIGNATURE if nix == "2.26" else "because it lacks a valid signature"  # 2.8's words
            assert f"cannot add path '{hook}' {why}" in copy.stderr
            assert Path(hook).name not in b.exec(["ls", "/nix/store"]).stdout
        ca = client.run(["nix", "copy", "--to", store, ca_hook])
        assert ca.returncode == 0, ca.stderr
        planted = hook if trusted else ca_hook

        # (a) Settings only root should choose, then a build, on one worker-protocol session.
        drv = client.run(["nix-instantiate", "--store", store, str(expr), "-A", "whoami"]).stdout.strip()
        assert drv.endswith(".drv"), drv
        overrides = {"post-build-hook": planted, "build-users-group": "", "sandbox": "false"}
        messages, error = daemon_session(farm, b, overrides, drv)
        assert error == "", (b.name, error)
        output = b.exec(["nix-store", "--query", "--outputs", drv]).stdout.strip()
        built_as = b.exec(["cat", output]).stdout.strip()
        ran = b.exec(["stat", "-c", "%u %n", HOOK_RAN], check=False)
        ignored = [
            f"ignoring the client-specified setting '{name}', because it is a restricted setting and you "
            "are not a trusted user"
            for name in sorted(overrides)
        ]
        if nix == "2.8" and trusted:
            # The risk of trusted mode: the key chose a program the daemon ran as root, and ran the
            # build itself as root (no build user).
            assert ran.stdout.strip() == f"0 {HOOK_RAN}", ran
            assert b.exec(["cat", HOOK_RAN]).stdout == "0\n"  # the hook's own `id -u`
            assert built_as == "0"
            continue
        # Nothing the key asked for ran as root: the build ran as a build user, the hook never ran.
        assert pwd.getpwuid(int(built_as)).pw_name.startswith("nixbld"), built_as
        assert ran.returncode != 0 and "No such file" in ran.stderr
        if nix == "2.8":  # the daemon saw the settings and refused them, with this warning
            assert [m for m in messages if m.startswith("ignoring the client")] == ignored, messages
        else:
            # Nix 2.26's `nix-daemon --stdio` (what the gateway execs) serves the session itself and
            # talks to the daemon over its own connection: the client's settings stay in that
            # process, trusted or not. Nothing says so.
            assert not [m for m in messages if "ignoring" in m], messages

        if nix == "2.26":
            # (c) The builder's store: a live path, liveness ignored, and dead paths.
            b.exec(["ln", "-s", planted, "/nix/var/nix/gcroots/nixfarm-test-root"])
            live = client.run(["nix", "store", "delete", "--store", store, planted])
            assert live.returncode != 0
            assert f"Cannot delete path '{planted}' since it is still alive" in live.stderr
            forced = client.run(["nix", "store", "delete", "--store", store, "--ignore-liveness", planted])
            assert forced.returncode != 0
            assert "error: you are not allowed to ignore liveness" in forced.stderr
            assert Path(planted).name in b.exec(["ls", "/nix/store"]).stdout
            # Dead paths, though, any user of the daemon may collect, trusted or not (Nix's rule;
            # the gateway cannot filter the protocol): a stolen key can empty the builder's cache
            # of dead paths, never a live one, and nothing of it runs as root.
            gc = client.run(["nix", "store", "gc", "--store", store, "--max", "1"])
            assert gc.returncode == 0, gc.stderr
            deleted = [line.split("'")[1] for line in gc.stderr.splitlines() if line.startswith("deleting '")]
            assert deleted, gc.stderr
            in_store = b.exec(["ls", "/nix/store"]).stdout
            assert all(Path(p).name not in in_store for p in deleted)
            assert Path(planted).name in in_store


def test_a_metrics_key_reaches_no_nix_daemon(farm: Farm) -> None:
    farm.add_client("watcher")
    b = farm.add_builder("u1", clients={"watcher": "metrics"}, nix="2.26", trusted=False)
    client = Client(farm.root, nix="2.26")
    store = store_uri(farm, "watcher", b)
    planted = farm.root / "planted.sh"
    planted.write_text("#!/bin/sh\n/usr/bin/id -u > /nix/var/planted\n")
    path = client.run(["nix-store", "--add", str(planted)]).stdout.strip()
    assert path.startswith("/nix/store/"), path
    before = b.exec(["ls", "/nix/store"]).stdout
    refusal = "nixfarm gateway: refused: 'nix-daemon --stdio' needs the build role"
    for argv in (
        ["nix", "store", "info", "--store", store],
        ["nix", "copy", "--no-check-sigs", "--to", store, path],
        ["nix", "store", "gc", "--store", store, "--max", "1"],
    ):
        result = client.run(argv)
        assert result.returncode != 0
        assert refusal in result.stderr, (argv, result.stderr)
    with pytest.raises(nixproto.ProtocolError, match="closed in the middle"):
        daemon_session(farm, b, {"post-build-hook": path}, f"{path}.drv", client_name="watcher")
    assert b.exec(["ls", "/nix/store"]).stdout == before
    assert (b.root / "gateway.log").read_text().count("refused client=watcher role=metrics") == 4
