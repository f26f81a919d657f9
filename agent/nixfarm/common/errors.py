"""The exceptions nixfarm raises on purpose, and the exit code each maps to.

`cli.main()` turns any of these into one line on stderr and its exit code;
anything else is a bug and keeps its traceback.
"""


class NixfarmError(Exception):
    """Base class: a failure we can explain in one line. Exit code 1."""

    exit_code = 1


class UsageError(NixfarmError):
    """Bad command line or bad configuration. Exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration file is missing, unreadable or has a bad key. Exit code 2."""


class RefusedError(NixfarmError):
    """The gateway refused a remote command. Exit code 1."""


class EnvironmentProblem(NixfarmError):
    """The machine lacks something we need (no Nix store, unreadable /proc). Exit code 3."""

    exit_code = 3
