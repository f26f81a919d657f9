"""nixfarm: agent and dispatcher for a self-hosted Nix build farm."""

import functools
import warnings

# asyncssh (2.24) still names DSA keys, which cryptography >= 48 deprecates:
# importing it printed ten CryptographyDeprecationWarning lines on every
# command that reaches a builder. nixfarm never uses DSA (keys are the
# inventory's, host keys pinned); only asyncssh's own import is silenced.
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"asyncssh(\.|$)")


@functools.cache
def version() -> str:
    """The installed version. Looked up on first use: importlib.metadata costs
    ~20 ms, which the gateway's exec path to nix-daemon must not pay."""
    from importlib import metadata

    try:
        return metadata.version("nixfarm")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0.0.0+src"
