"""Logging to the systemd journal where there is one, else to a file or stderr."""

from __future__ import annotations

import logging
import os
import sys

from .notify import JOURNAL_SOCKET


def _journal_handler(identifier: str) -> logging.Handler | None:
    if not os.path.exists(JOURNAL_SOCKET):
        return None
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    return JournalHandler(SYSLOG_IDENTIFIER=identifier)


def setup(name: str, identifier: str, log_file: str = "", stderr_level: int = logging.INFO) -> logging.Logger:
    """Give logger `name` one handler: journal, else `log_file`, else stderr at `stderr_level`."""
    logger = logging.getLogger(name)
    if logger.handlers:
        return logger
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = _journal_handler(identifier)
    if handler is not None:
        # The journal records time, identifier and PID itself: the message stays bare.
        logger.addHandler(handler)
        return logger
    if log_file:
        try:
            handler = logging.FileHandler(log_file)
        except OSError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(stderr_level)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {identifier}[%(process)d]: %(message)s"))
    logger.addHandler(handler)
    return logger
