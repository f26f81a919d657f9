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
from typing import Any

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


class Client:
    """The client side of the harness: host-namespace Nix with its own config."""

    def __init__(self, root: Path, poll_interval: int = 5) -> None:
        self.conf_dir = root / f"client-nix-{poll_interval}"
        self.conf_dir.mkdir(exist_ok=True)
        (self.conf_dir / "nix.conf").write_text(
            # No substituters: the network is closed here, and a cache lookup would
            # otherwise wait on a DNS failure for every build.
            "substituters =\nsandbox = false\nbuilders-use-substitutes = false\n"
            "experimental-features = nix-command\n"
            # How long a build the hook postponed waits before asking again (Nix's default: 5).
            f"build-poll-interval = {poll_interval}\n"
        )

    def env(self) -> dict[str, str]:
        return {**os.environ, "NIX_CONF_DIR": str(self.conf_dir)}

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
            str(BUILDS_NIX),
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
        return argv


@pytest.fixture
def client(farm: farm_mod.Farm) -> Client:
    """Nix on the host namespace, configured as a farm client."""
    return Client(farm.root)
