"""How nixfarm reaches a builder over SSH, the way nix-daemon's ssh does.

Shared by `nixfarm dispatch` and `nixfarm doctor`: the client's own key only
(no agent, no ssh_config of whoever runs us), and strict host-key checking
against the one key the inventory pins for that builder.
"""

from __future__ import annotations

from typing import Any

import asyncssh

from .inventory import Builder


def pinned_known_hosts(builder: Builder) -> tuple[list[asyncssh.SSHKey], list[Any], list[Any]]:
    """asyncssh `known_hosts` that trusts only this builder's key, whatever the host name."""
    return ([asyncssh.import_public_key(builder.host_key)], [], [])


def connect_options(
    key_file: str,
    builder: Builder,
    *,
    connect_timeout: float,
    keepalive: float | None = None,
    keepalive_count: int = 3,
) -> dict[str, Any]:
    """asyncssh.connect() arguments: the client key, the pinned host key, timeouts, keepalives."""
    options: dict[str, Any] = {
        "host": builder.address,
        "port": builder.port,
        "username": builder.ssh_user,
        "client_keys": [key_file],
        "known_hosts": pinned_known_hosts(builder),
        "agent_path": None,
        "config": None,
        "connect_timeout": connect_timeout,
    }
    if keepalive is not None:
        options["keepalive_interval"] = keepalive
        options["keepalive_count_max"] = keepalive_count
    return options
