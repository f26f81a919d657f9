"""The names of clients and builders: what the farm inventory allows.

Both sides check them: the gateway and the relay before a name touches a
file or a log line, the client when it reads the inventory.
"""

from __future__ import annotations

import re

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
