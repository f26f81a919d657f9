"""A local demo farm: three builders of different sizes, two clients building at once.

    tests/demo [--builds N] [--seconds S] [--json FILE]

Starts three harness builders (4, 2 and 1 build slots, each a network
namespace with its own sshd, nix-daemon and store), gives two clients a
machines file, sends N builds of S seconds from each client at the same time,
shows every builder's live metrics (read over SSH through the gateway with
`nixfarm stream`), then prints a summary and tears everything down, also on
Ctrl-C. Each build holds one of its builder's slots while it works, so a
builder really can run only that many at once (DESIGN.md).

The clients use a static machines file here (every client lists every
builder with maxJobs = its slots, as the nix.dev tutorial does); the
load-aware dispatcher replaces it when it lands.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import Client
from farm import Builder, Farm

BUILDERS = {"big": 4, "medium": 2, "small": 1}  # name -> build slots
CLIENTS = ("alice", "bob")


class LiveMetrics:
    """The latest snapshot of each builder, from one `nixfarm stream` over SSH each."""

    def __init__(self, farm: Farm, builders: list[Builder]) -> None:
        self.latest: dict[str, dict[str, Any]] = {}
        self._procs = []
        for b in builders:
            argv = [*farm.ssh_argv("watcher", b), "nixfarm stream --interval 0.5"]
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._procs.append(proc)
            threading.Thread(target=self._read, args=(b.name, proc), daemon=True).start()

    def _read(self, name: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.latest[name] = json.loads(line)

    def close(self) -> None:
        for proc in self._procs:
            proc.terminate()
            proc.wait()


def table(live: LiveMetrics, elapsed: float, done: dict[str, float | None]) -> str:
    rows = [
        f"nixfarm demo: {elapsed:5.1f} s   "
        + "   ".join(f"{c}: {f'done in {t:.1f} s' if t else 'building'}" for c, t in done.items()),
        "",
        f"{'builder':8} {'slots':>5} {'active':>6} {'load1':>6} {'store free':>11} {'rx KiB/s':>9}",
    ]
    for name, slots in BUILDERS.items():
        snap = live.latest.get(name)
        if snap is None:
            rows.append(f"{name:8} {slots:>5} {'-':>6}")
            continue
        rx = snap["network"]["rx_bytes_per_second"] or 0
        rows.append(
            f"{name:8} {slots:>5} {snap['builds']['active']:>6} {snap['load']['avg1']:>6.2f} "
            f"{snap['store']['free_bytes'] / 2**20:>8.1f} MiB {rx / 1024:>9.1f}"
        )
    return "\n".join(rows)


def start_farm(farm: Farm) -> dict[str, Builder]:
    for client in CLIENTS:
        farm.add_client(client)
    farm.add_client("watcher")
    roles = {**dict.fromkeys(CLIENTS, "build"), "watcher": "metrics"}
    return {
        name: farm.add_builder(name, clients=roles, max_jobs=slots, slots=slots, store_size="256m")
        for name, slots in BUILDERS.items()
    }


def run(builds: int, seconds: int) -> dict[str, Any]:
    with Farm() as farm:
        builders = start_farm(farm)
        live = LiveMetrics(farm, list(builders.values()))
        procs = {}
        started = time.monotonic()
        for client in CLIENTS:
            machines = farm.root / f"machines-{client}"
            key = farm.client_keys[client]
            machines.write_text(
                "".join(
                    b.machines_line(key, max_jobs=BUILDERS[n]) + "\n" for n, b in builders.items()
                )
            )
            argv = Client(farm.root).build_argv(
                f"@{machines}",
                f"{farm.id}{client}{secrets.token_hex(2)}",
                count=builds,
                seconds=seconds,
                slots=1,
            )
            procs[client] = subprocess.Popen(
                argv,
                env=Client(farm.root).env(),
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        done: dict[str, float | None] = dict.fromkeys(CLIENTS)
        outputs: dict[str, list[str]] = {}
        try:
            while not all(done.values()):
                for client, proc in procs.items():
                    if done[client] is None and proc.poll() is not None:
                        done[client] = time.monotonic() - started
                        stdout, stderr = proc.communicate()
                        if proc.returncode != 0:
                            raise SystemExit(f"{client}'s builds failed:\n{stderr[-2000:]}")
                        outputs[client] = stdout.split()
                sys.stdout.write(
                    "\033[H\033[J" + table(live, time.monotonic() - started, done) + "\n"
                )
                sys.stdout.flush()
                time.sleep(0.5)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
            live.close()
        placed = Counter(
            Path(p).read_text().split()[-1] for paths in outputs.values() for p in paths
        )
        makespan = max(t for t in done.values() if t)
        work = len(CLIENTS) * builds * seconds
        return {
            "builds_per_builder": {name: placed.get(name, 0) for name in BUILDERS},
            "client_seconds": done,
            "makespan_seconds": round(makespan, 2),
            "lower_bound_seconds": max(seconds, work / sum(BUILDERS.values())),
            "builds": len(CLIENTS) * builds,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builds", type=int, default=8, help="builds per client (default 8)")
    parser.add_argument(
        "--seconds", type=int, default=2, help="seconds each build works (default 2)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    args = parser.parse_args()
    # Ctrl-C and SIGTERM both end the demo through the farm's teardown.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        summary = run(args.builds, args.seconds)
    except KeyboardInterrupt:
        print("\ninterrupted: farm torn down", file=sys.stderr)
        return 130
    print("\nsummary")
    for name, count in summary["builds_per_builder"].items():
        print(f"  {name:8} ({BUILDERS[name]} slots): {count} builds")
    print(
        f"  makespan {summary['makespan_seconds']} s for {summary['builds']} builds "
        f"(best possible {summary['lower_bound_seconds']:.1f} s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
