"""A running `nixfarm dispatch` on the harness, for the tests that need one."""

from __future__ import annotations

import json
import subprocess
import time

from farm import Builder, Farm

INTERVAL, KEEPALIVE, BACKOFF = 1.0, 1.0, 2.0


class Dispatcher:
    """A running `nixfarm dispatch` for client alice."""

    def __init__(
        self, farm: Farm, builders: list[Builder], static_max_jobs: int = 2, current_load: str | None = None
    ) -> None:
        self.farm = farm
        inventory = farm.write_inventory("alice", builders, max_jobs=static_max_jobs)
        self.machines = farm.root / "clients" / "alice" / "machines"
        timing = ["--interval", str(INTERVAL), "--keepalive", str(KEEPALIVE), "--backoff-base", str(BACKOFF)]
        argv = [farm.nixfarm, "dispatch", "--inventory", str(inventory), "--machines", str(self.machines)]
        argv += timing
        if current_load:  # the store of a client whose Nix is not the machine's (Client.current_load)
            argv += ["--current-load", current_load]
        self.log = farm.root / "dispatch.log"
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log.open("wb"))
        # It writes its first status at once; before that `nixfarm status` rightly says there is none.
        status_file = self.machines.parent / "dispatch-status.json"
        self.wait("the first status", status_file.exists)

    def status(self) -> dict[str, dict]:  # type: ignore[type-arg]
        out = subprocess.run([self.farm.nixfarm, "status", "--json", "--machines", str(self.machines)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return {b["name"]: b for b in json.loads(out)["builders"]}

    def listed(self) -> set[str]:
        text = self.machines.read_text() if self.machines.exists() else ""
        return {b.name for b in self.farm.builders.values() if f"@{b.address} " in text}

    def wait(self, what: str, check, timeout: float = 20) -> float:  # type: ignore[no-untyped-def]
        """Seconds until check() is true (fails the test after `timeout`)."""
        start = time.monotonic()
        while not check():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s; {self.status()}"
            time.sleep(0.05)
        return time.monotonic() - start

    def stop(self) -> None:
        self.proc.terminate()
        assert self.proc.wait(timeout=10) == 0, self.log.read_text()
