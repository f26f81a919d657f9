"""nixfarm: agent and dispatcher for a self-hosted Nix build farm."""

from importlib import metadata

try:
    __version__ = metadata.version("nixfarm")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"
