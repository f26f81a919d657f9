"""nixfarm: agent and dispatcher for a self-hosted Nix build farm."""

import functools


@functools.cache
def version() -> str:
    """The installed version. Looked up on first use: importlib.metadata costs
    ~20 ms, which the gateway's exec path to nix-daemon must not pay."""
    from importlib import metadata

    try:
        return metadata.version("nixfarm")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0.0.0+src"
