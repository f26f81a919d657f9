"""Shared fixtures: the farm harness (tests/farm.py) and test derivations."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import farm as farm_mod

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUILDS_NIX = HERE / "builds.nix"
# modules/lib.nix uses only builtins: plain `nix-instantiate --eval` runs it without nixpkgs.
LIB = REPO / "modules" / "lib.nix"
NIX_INSTANTIATE = shutil.which("nix-instantiate")


def _eval_lib(expr: str, arg: object) -> subprocess.CompletedProcess[str]:
    assert NIX_INSTANTIATE is not None
    source = (
        f'let lib = import {LIB}; arg = builtins.fromJSON (builtins.getEnv "NIXFARM_TEST_ARG"); in {expr}'
    )
    return subprocess.run(
        [NIX_INSTANTIATE, "--eval", "--strict", "--json", "-E", source],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        env={**os.environ, "NIXFARM_TEST_ARG": json.dumps(arg)},
    )


def nix_eval(expr: str, arg: object = None) -> Any:
    """Evaluate `expr` (with `lib` and `arg` in scope) and return its JSON value."""
    proc = _eval_lib(expr, arg)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def nix_error(expr: str, arg: object = None) -> str:
    """Evaluate `expr`, which must fail; return Nix's error output."""
    proc = _eval_lib(expr, arg)
    assert proc.returncode != 0, f"expected an error, got {proc.stdout}"
    return proc.stderr


def harness_missing() -> str | None:
    """Why the harness cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, mounts, users): run tests/run as root"
    for tool in ("nix-build", "nix-daemon", "sshd", "ssh", "nsenter", "unshare"):
        if not shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin"):
            return f"needs {tool}: tests/run installs it"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = harness_missing()
    if reason is None:
        return
    for item in items:
        if "farm" in getattr(item, "fixturenames", ()) or item.get_closest_marker("harness"):
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "harness: needs root and the farm harness")
    config.addinivalue_line(
        "markers",
        "needs_nixpkgs: evaluates the NixOS modules; needs env NIXPKGS pointing at a nixpkgs tree",
    )
    # asyncssh's own import (DSA, deprecated by cryptography): nixfarm silences it the same
    # way (nixfarm/__init__.py), but a test may import asyncssh first.
    config.addinivalue_line("filterwarnings", "ignore:DSA is deprecated:UserWarning")


def _ci_skips(config: pytest.Config) -> int:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    # nixpkgs cannot be had here (no network to fetch it); those tests say so when they skip.
    skipped = [r for r in skipped if "needs_nixpkgs" not in r.keywords]
    return len(skipped) if os.environ.get("CI") == "true" else 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI every test that can run here must run: a skip there fails the run."""
    if _ci_skips(session.config) and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if skips := _ci_skips(terminalreporter.config):
        terminalreporter.write_line(f"CI: {skips} test(s) skipped; every test must run in CI", red=True)


@pytest.fixture
def farm() -> Iterator[farm_mod.Farm]:
    """A fresh, empty farm; torn down after the test, pass or fail."""
    with farm_mod.Farm() as f:
        yield f


class NixPair(NamedTuple):
    """The Nix version of the client and of the builders in one test."""

    client: str
    builder: str


# Each Nix alone, and each as a client of the other (tests/nix_root.py has 2.26).
NIX_PAIRS = [NixPair("2.8", "2.8"), NixPair("2.26", "2.26"), NixPair("2.26", "2.8"), NixPair("2.8", "2.26")]


@pytest.fixture(params=NIX_PAIRS, ids=lambda p: f"client{p.client}-builder{p.builder}")
def nix(request: pytest.FixtureRequest) -> NixPair:
    """Run the test once for each pair of client and builder Nix versions."""
    pair: NixPair = request.param
    return pair


# Runs argv[2:] with the directory argv[1] bound over /nix (in a private mount namespace).
_BIND_NIX = (
    "import os, subprocess, sys; "
    "subprocess.run(['mount', '--bind', sys.argv[1], '/nix'], check=True); "
    "os.execvp(sys.argv[2], sys.argv[2:])"
)


class Client:
    """The client side of the harness: Nix with its own config, the host's Nix 2.8 or,
    with nix="2.26", Nix 2.26 chrooted into the Debian 13 root (tests/nix_root.py) with
    a store of its own in the farm's directory.

    `signing_key` (a secret key file under the farm's directory: Farm.make_signing_key)
    goes into `secret-key-files`, as the client module sets it in the untrusted mode:
    Nix then signs every path it builds with it. `sign_outputs=True` also signs what remote
    builds send back (a post-build-hook running `nix store sign`, which the client's Nix runs
    for remote builds too): outputs arrive unsigned from a builder without a key of its own,
    and another untrusted builder refuses them as inputs.

    `own_store=True` gives a Nix 2.8 client a store of its own too (its /nix a directory
    of the farm, bound over /nix in a mount namespace of its own), for tests that change
    what the whole store holds (signatures) and must leave the machine's store alone."""

    def __init__(
        self,
        root: Path,
        poll_interval: int = 5,
        nix: str = "2.8",
        signing_key: Path | None = None,
        own_store: bool = False,
        sign_outputs: bool = False,
    ) -> None:
        self.nix = nix
        self.farm_root = root
        signed = ("-signed" if signing_key else "") + ("-outputs" if sign_outputs else "")
        self.conf_dir = root / f"client-nix-{nix}-{poll_interval}{signed}"
        self.conf_dir.mkdir(exist_ok=True)
        self.builds_nix = BUILDS_NIX
        self.store: Path | None = None
        if nix == "2.8" and own_store:
            self.store = root / "client-nix-2.8-store"
            self.store.mkdir(exist_ok=True)
        elif nix == "2.26":
            self.store = root / "client-nix-2.26-store"  # its /nix, kept for the farm's life
            self.store.mkdir(exist_ok=True)
            # The root has no mount point for the working tree; the farm's directory it has.
            self.builds_nix = self.conf_dir / "builds.nix"
            shutil.copy(BUILDS_NIX, self.builds_nix)
        elif nix != "2.8":
            raise ValueError(f"no client Nix {nix!r} here; the harness has {farm_mod.nix_root.NIX_VERSIONS}")
        (self.conf_dir / "nix.conf").write_text(
            # No substituters: the network is closed here, and a cache lookup would
            # otherwise wait on a DNS failure for every build.
            "substituters =\nsandbox = false\nbuilders-use-substitutes = false\n"
            "experimental-features = nix-command\n"
            # How long a build the hook postponed waits before asking again (Nix's default: 5).
            f"build-poll-interval = {poll_interval}\n"
            + (f"secret-key-files = {signing_key}\n" if signing_key else "")
        )
        if sign_outputs:
            if signing_key is None:
                raise ValueError("sign_outputs needs a signing_key")
            hook = self.conf_dir / "sign-outputs"
            hook.write_text(
                "#!/bin/sh\n# Nix's post-build-hook: OUT_PATHS are the outputs just built, here or remotely\n"
                "exec nix --extra-experimental-features nix-command store sign "
                f"--key-file {signing_key} $OUT_PATHS\n"
            )
            hook.chmod(0o755)
            with (self.conf_dir / "nix.conf").open("a") as f:
                f.write(f"post-build-hook = {hook}\n")

    def env(self) -> dict[str, str]:
        return {**os.environ, "NIX_CONF_DIR": str(self.conf_dir)}

    def argv(self, argv: list[str]) -> list[str]:
        """argv as this client runs it: as it is, or chrooted into the Nix 2.26 root."""
        if self.nix == "2.8":
            if self.store is None:
                return argv
            # Nix 2.8 lives in /usr: only the store and its database move.
            return [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                sys.executable,
                "-c",
                _BIND_NIX,
                str(self.store),
                *argv,
            ]
        assert self.store is not None
        spec = {
            "root": str(farm_mod.nix_root.ensure_root()),
            "nix": str(self.store),
            "binds": [[str(self.farm_root), str(self.farm_root)]],
        }
        enter = [sys.executable, farm_mod.nix_root.__file__, json.dumps(spec), "--"]
        return ["unshare", "--mount", "--propagation", "private", "--", *enter, *argv]

    @property
    def current_load(self) -> str:
        """Where this client's Nix keeps its slot locks (its build hook makes it at its first
        remote build; made here for those who hold slots before that)."""
        nix_dir = self.store or Path("/nix")
        path = nix_dir / "var" / "nix" / "current-load"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def read(self, store_path: str) -> str:
        """The contents of an output in this client's store."""
        if self.store is None:
            return Path(store_path).read_text()
        return (self.store / Path(store_path).relative_to("/nix")).read_text()

    @property
    def nixfarm(self) -> str:
        """The `nixfarm` program as this client runs it (in the 2.26 root: this tree on its Python)."""
        if self.nix == "2.26":
            return farm_mod.nix_root.LAUNCHER
        return str(Path(sys.executable).parent / "nixfarm")

    def run(self, argv: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """Run argv as this client (its Nix config, its store); not checked."""
        return subprocess.run(
            self.argv(argv), text=True, capture_output=True, env=self.env(), timeout=timeout
        )

    def build(
        self, builders: str, nonce: str | None = None, timeout: float = 180, **args: int | str
    ) -> subprocess.CompletedProcess[str]:
        """nix-build tests/builds.nix with only remote builders (max-jobs 0)."""
        return subprocess.run(
            self.build_argv(builders, nonce, **args),
            text=True,
            capture_output=True,
            env=self.env(),
            timeout=timeout,
        )

    def build_argv(self, builders: str, nonce: str | None = None, **args: int | str) -> list[str]:
        argv = [
            "nix-build",
            str(self.builds_nix),
            "--no-out-link",
            "--max-jobs",
            "0",
            "--builders",
            builders,
            "--argstr",
            "nonce",
            nonce or secrets.token_hex(4),
        ]
        for name, value in args.items():
            argv += ["--arg", name, str(value)] if isinstance(value, int) else ["--argstr", name, value]
        return self.argv(argv)


@pytest.fixture
def client(farm: farm_mod.Farm) -> Client:
    """Nix on the host namespace, configured as a farm client."""
    return Client(farm.root)
