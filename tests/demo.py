"""A local demo farm: three builders of different sizes, two clients building at once.

    tests/demo [--builds N] [--seconds S] [--static] [--json FILE]

Starts three harness builders (4, 2 and 1 build slots; each a network
namespace with its own sshd, nix-daemon, store and nixfarm agent), and for
each of two clients a `nixfarm dispatch` keeping that client's machines file.
Both clients send N builds of S seconds at the same time while the live
`nixfarm status` of the first client is shown; then `nixfarm usage` (the
builders' per-client accounts) and a summary (builds per
builder, makespan against the best possible), and everything is torn down,
also on Ctrl-C. Each build holds one of its builder's slots while it works,
so a builder really runs only that many at once (DESIGN.md). Each client
builds in its own store (`--store local?root=...`), as separate machines do:
Nix counts a builder's load in the store's current-load directory. Each
client's ssh shares one connection per builder, as the NixOS client module
sets it up (connectionSharing).

--static runs the same with the nix.dev tutorial's static machines file
(every client lists every builder with maxJobs = its slots) and a new SSH
connection for every build, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import Client
from farm import Builder, Farm
from nixfarm.client.status import read_status, render, status_path

BUILDERS = {"big": 4, "medium": 2, "small": 1}  # name -> build slots
CLIENTS = ("alice", "bob")
# build-poll-interval: what the NixOS client module sets with the dispatcher (1),
# Nix's default for the static file (5).
POLL = {"dispatcher": 1, "static": 5}


def client_store(farm: Farm, client: str) -> Path:
    return farm.root / "clients" / client / "store"


def start_farm(farm: Farm) -> dict[str, Builder]:
    """Three builders, each with its agent; both clients may build everywhere."""
    for client in CLIENTS:
        farm.add_client(client)
    builders = {
        name: farm.add_builder(
            name,
            clients=dict.fromkeys(CLIENTS, "build"),
            max_jobs=slots,
            slots=slots,
            store_size="256m",
            agent_config={"min_free": "32M", "max_free": "64M"},
        )
        for name, slots in BUILDERS.items()
    }
    for b in builders.values():
        farm.start_agent(b, "--interval", "1")
    return builders


def machines_files(
    farm: Farm, builders: dict[str, Builder], static: bool
) -> tuple[dict[str, Path], list[Any]]:
    """Each client's machines file, kept by its own dispatcher (or written once, --static)."""
    files, dispatchers = {}, []
    for client in CLIENTS:
        path = farm.root / "clients" / client / "machines"
        files[client] = path
        if static:
            key = farm.client_keys[client]
            path.write_text(
                "".join(b.machines_line(key, max_jobs=BUILDERS[n]) + "\n" for n, b in builders.items())
            )
            continue
        inventory = farm.write_inventory(client, list(builders.values()))
        argv = [
            farm.nixfarm,
            "dispatch",
            "--inventory",
            str(inventory),
            "--machines",
            str(path),
            "--interval",
            "1",
            "--keepalive",
            "2",
            "--backoff-base",
            "5",
            "--current-load",
            str(client_store(farm, client) / "nix/var/nix/current-load"),
        ]
        log = (farm.root / f"dispatch-{client}.log").open("wb")
        dispatchers.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log))
    deadline = time.monotonic() + 20
    while not static and not all(
        p.exists() and p.read_text().count("ssh-ng://") == 3 for p in files.values()
    ):
        if time.monotonic() > deadline:
            raise SystemExit("the dispatchers did not list all three builders within 20 s")
        time.sleep(0.1)
    return files, dispatchers


def show(files: dict[str, Path], started: float, done: dict[str, float | None], static: bool) -> None:
    """Redraw the screen: the clients' progress and the first client's nixfarm status."""
    from rich.console import Console

    console = Console()
    progress = "   ".join(f"{c}: {f'done in {t:.1f} s' if t else 'building'}" for c, t in done.items())
    console.clear()
    console.print(f"nixfarm demo: {time.monotonic() - started:5.1f} s   {progress}")
    if static:
        console.print("(static machines file: no dispatcher, no status)")
        return
    console.print(render(read_status(status_path(str(files[CLIENTS[0]]))), time.time()), soft_wrap=True)


def farm_usage(farm: Farm, builders: dict[str, Builder], expected: int) -> list[dict[str, Any]]:
    """`nixfarm usage` of the farm (the builders' per-client accounts), once every build is counted;
    the table is shown too."""
    inventory = str(farm.write_inventory(CLIENTS[0], list(builders.values())))
    usage = [farm.nixfarm, "usage", "--inventory", inventory]
    deadline = time.monotonic() + 15  # a build counts once its outputs are valid there
    while True:
        result = subprocess.run([*usage, "--json"], capture_output=True, text=True, timeout=60)
        rows: list[dict[str, Any]] = json.loads(result.stdout)["rows"] if result.returncode == 0 else []
        if sum(r["builds_finished"] for r in rows) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print()
    subprocess.run(usage, timeout=60, check=False)
    return rows


def run(builds: int, seconds: int, static: bool) -> dict[str, Any]:
    with Farm() as farm:
        builders = start_farm(farm)
        files, dispatchers = machines_files(farm, builders, static)
        client = Client(farm.root, poll_interval=POLL["static" if static else "dispatcher"])
        started = time.monotonic()
        procs = {
            c: subprocess.Popen(
                [
                    *client.build_argv(
                        f"@{files[c]}",
                        f"{farm.id}{c}{secrets.token_hex(2)}",
                        count=builds,
                        seconds=seconds,
                        slots=1,
                    ),
                    "--store",
                    f"local?root={client_store(farm, c)}",
                ],
                # The client module's connection sharing comes with the dispatcher; the
                # nix.dev tutorial's static file comes without.
                env=client.env() if static else {**client.env(), "NIX_SSHOPTS": farm.shared_ssh_options(c)},
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for c in CLIENTS
        }
        done: dict[str, float | None] = dict.fromkeys(CLIENTS)
        outputs: dict[str, list[str]] = {}
        try:
            while not all(done.values()):
                for c, proc in procs.items():
                    if done[c] is None and proc.poll() is not None:
                        done[c] = time.monotonic() - started
                        stdout, stderr = proc.communicate()
                        if proc.returncode != 0:
                            raise SystemExit(f"{c}'s builds failed:\n{stderr[-2000:]}")
                        # Paths in the client's store, which lives under its root.
                        outputs[c] = [str(client_store(farm, c)) + p for p in stdout.split()]
                show(files, started, done, static)
                time.sleep(0.5)
        finally:
            for proc in [*procs.values(), *dispatchers]:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
        placed = Counter(Path(p).read_text().split()[-1] for paths in outputs.values() for p in paths)
        work = len(CLIENTS) * builds * seconds
        usage = farm_usage(farm, builders, len(CLIENTS) * builds)
        return {
            "mode": "static" if static else "dispatcher",
            "builds_per_builder": {name: placed.get(name, 0) for name in BUILDERS},
            "client_seconds": done,
            "makespan_seconds": round(max(t for t in done.values() if t), 2),
            "lower_bound_seconds": max(seconds, work / sum(BUILDERS.values())),
            "builds": len(CLIENTS) * builds,
            # As the builders accounted them (docs/metrics.md, "Accounts").
            "usage_by_client": {
                r["client"]: {
                    k: r[k] for k in ("builds_started", "builds_finished", "builds_failed", "build_seconds")
                }
                for r in usage
            },
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builds", type=int, default=8, help="builds per client (default 8)")
    parser.add_argument("--seconds", type=int, default=2, help="seconds each build works (default 2)")
    parser.add_argument(
        "--static", action="store_true", help="a static machines file instead of the dispatcher"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    args = parser.parse_args()
    # Ctrl-C and SIGTERM both end the demo through the farm's teardown.
    demo = os.getpid()

    def interrupt(signum: int, frame: object) -> None:
        if os.getpid() != demo:  # a helper pyroute2 forked, which pyroute2 stops with SIGTERM
            os._exit(128 + signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        summary = run(args.builds, args.seconds, args.static)
    except KeyboardInterrupt:
        print("\ninterrupted: farm torn down", file=sys.stderr)
        return 130
    print(f"\nsummary ({summary['mode']})")
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
