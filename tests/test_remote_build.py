"""Real nix-build from a client, built on a harness builder through the gateway: with each
Nix on both ends (conftest.NIX_PAIRS: 2.8 and 2.26, and each as a client of the other)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Client, NixPair
from farm import Farm


@pytest.mark.parametrize(
    ("protocol", "remote_command"),
    [("ssh-ng", "nix-daemon --stdio"), ("ssh", "nix-store --serve --write")],
)
def test_build_runs_on_the_builder_through_the_gateway(
    farm: Farm, nix: NixPair, protocol: str, remote_command: str
) -> None:
    client = Client(farm.root, nix=nix.client)
    key = farm.add_client("alice")
    b1 = farm.add_builder("b1", clients={"alice": "build"}, nix=nix.builder)
    b2 = farm.add_builder("b2", clients={"alice": "build"}, nix=nix.builder)

    result = client.build(b1.machines_line(key, protocol))

    assert result.returncode == 0, result.stderr
    out = Path(result.stdout.strip())
    assert client.read(str(out)) == "built on b1\n"  # the builder's own hostname
    assert out.name in b1.exec(["ls", "/nix/store"]).stdout
    assert out.name not in b2.exec(["ls", "/nix/store"]).stdout
    log = (b1.root / "gateway.log").read_text()
    assert f"allowed client=alice role=build from={b1.client_address} command='{remote_command}'" in log


def test_metrics_role_cannot_build(farm: Farm, client: Client) -> None:
    key = farm.add_client("watcher")
    b1 = farm.add_builder("b1", clients={"watcher": "metrics"})

    result = client.build(b1.machines_line(key, "ssh-ng"), timeout=60)

    assert result.returncode != 0
    assert "nixfarm gateway: refused: 'nix-daemon --stdio' needs the build role" in result.stderr
    assert "refused client=watcher role=metrics" in (b1.root / "gateway.log").read_text()
