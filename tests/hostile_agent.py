"""A broken or hostile agent, for the dispatcher's tests: forced command of a test key.

    hostile_agent.py garbage|truncated|huge|stall|schema

Each mode first does what it says on stdout; the real sshd carries it to the
dispatcher exactly as it would carry a compromised agent's output.
"""

import json
import os
import sys
import time

SNAPSHOT = {
    "schema": 1,
    "nix_config": {"max_jobs": 2, "min_free_bytes": 0},
    "builds": {"active": 0, "sessions_by_client": {}},
    "store": {"free_bytes": 1 << 30, "total_bytes": 2 << 30},
}


def emit(data: bytes) -> None:
    os.write(1, data)


def main() -> None:
    mode = sys.argv[1]
    if mode == "garbage":
        emit(os.urandom(4096).replace(b"\n", b"x") + b"\n")
    elif mode == "truncated":
        emit(json.dumps(SNAPSHOT).encode()[:20] + b"\n")
    elif mode == "huge":
        emit(b'{"schema": 1, "pad": "' + b"A" * (10 << 20))  # 10 MiB, no end in sight
    elif mode == "stall":
        emit(json.dumps(SNAPSHOT).encode() + b"\n")
    elif mode == "schema":
        emit(json.dumps({**SNAPSHOT, "schema": 99}).encode() + b"\n")
    time.sleep(3600)  # keep the session open: the dispatcher must decide, not the EOF


if __name__ == "__main__":
    main()
