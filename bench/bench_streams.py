"""What a builder pays for its clients' streams: old (each stream its own snapshots) vs new.

    .venv/bin/python bench/bench_streams.py [--quick] [--old-rev REV] [--json OUT]

"old" is the agent code of git commit REV (default: where this branch left
main), installed beside this tree's on the same harness builder, in the
same run: its streams take their own snapshots. "new" is this tree: the
agent takes one snapshot per snapshot_interval and serves every stream
(relay.py).

a. snapshot: one Collector.snapshot() inside the builder, the old code as
   the builder user (as its streams ran it), the new code as root (as the
   agent runs it); with the builder's own processes, and with 3,000 extra
   idle processes (`sleep`, started in the builder, killed after).
b. N streams (20, 100) over real SSH through the gateway at the
   dispatcher's default interval (2 s), the agent of the same code running:
   CPU (% of one core) and PSS of the builder's nixfarm processes (agent,
   stream processes), and of sshd per connection, over a window of steady
   state; idle, and with the 3,000 extra processes. The old code with 100
   streams and 3,000 processes is left out (about 2.5 cores' worth on a
   2-core machine another developer shares); the table extrapolates it.

Uses one harness builder (tests/farm.py) and tears it down on exit. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from runinfo import check_clean, machine_info, other_farms  # noqa: E402

import farm  # noqa: E402

INTERVAL = 2.0  # the dispatcher's default stream interval
EXTRA_PROCESSES = 3000
TICK = os.sysconf("SC_CLK_TCK")

SNAPSHOT_CODE = """
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
from nixfarm.builder.config import load_config
from nixfarm.builder.metrics import Collector
c = Collector(load_config(sys.argv[2]))
for _ in range(10):
    c.snapshot()
ms = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter(); c.snapshot(); ms.append((time.perf_counter() - t) * 1000)
print(json.dumps({"median_ms": statistics.median(ms),
                  "p90_ms": statistics.quantiles(ms, n=10, method="inclusive")[-1], "n": len(ms)}))
"""

SPAWN_CODE = """
import subprocess, sys
quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
ps = [subprocess.Popen(["sleep", "100000"], start_new_session=True, **quiet) for _ in range(int(sys.argv[1]))]
print(" ".join(str(p.pid) for p in ps))
"""


def unpack(f: farm.Farm, rev: str) -> Path:
    """The agent/ of git commit `rev`, unpacked in the farm's directory (readable by the builder user)."""
    tree = f.root / f"agent-{rev}"
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", rev, "agent"],
                             capture_output=True, check=True).stdout  # fmt: skip
    tree.mkdir()
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    subprocess.run(["chmod", "-R", "a+rX", str(tree)], check=True)
    return tree / "agent"


def wrapper(f: farm.Farm, name: str, source: Path) -> Path:
    """A `nixfarm` executable running the code in `source` with this venv's Python and dependencies."""
    path = f.root / f"nixfarm-{name}"
    code = "import sys; sys.path.insert(0, sys.argv.pop(1)); from nixfarm.cli import main; sys.exit(main())"
    path.write_text(f"#!/bin/sh\nexec {f.python} -c '{code}' {source} \"$@\"\n")
    path.chmod(0o755)
    return path


# -- processes of the builder, seen from the host ---------------------------


def builder_pids(b: farm.Builder) -> list[int]:
    """Host PIDs of every process in the builder's PID namespace."""
    ns = os.readlink(f"/proc/{b.init_pid}/ns/pid")
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink(f"/proc/{name}/ns/pid") == ns:
                    pids.append(int(name))
            except OSError:
                continue
    return pids


def kind_of(cmdline: str) -> str | None:
    """What a builder process is, for the accounting: nixfarm, sshd, shell (the login shell
    this sshd keeps around a forced command), or None (not counted: nix-daemon, the harness)."""
    if cmdline.startswith("sshd: ") and "[listener]" not in cmdline:
        return "sshd"
    if cmdline.startswith("sh -c "):
        return "shell"
    if cmdline.strip() == "cat" or ("nixfarm" in cmdline and "farm_init" not in cmdline):
        return "nixfarm"
    return None


def sample(b: farm.Builder) -> dict[int, tuple[str, int, float]]:
    """pid -> (kind, CPU ticks so far, PSS MiB) of the counted builder processes."""
    out = {}
    for pid in builder_pids(b):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            kind = kind_of(cmdline)
            if kind is None:
                continue
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat.rpartition(")")[2].split()
            ticks = int(fields[11]) + int(fields[12])  # utime, stime
            pss = 0.0
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            continue
        out[pid] = (kind, ticks, pss)
    return out


# -- streams ------------------------------------------------------------------


class Streams:
    """N `nixfarm stream` sessions of one client key, their lines drained and counted."""

    def __init__(self, f: farm.Farm, b: farm.Builder, client: str, count: int) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.lines = [0] * count
        self._selector = selectors.DefaultSelector()
        self._stop = False
        argv = [*f.ssh_argv(client, b), f"nixfarm stream --interval {INTERVAL:g}"]
        for i in range(count):
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
            assert proc.stdout is not None
            os.set_blocking(proc.stdout.fileno(), False)
            self._selector.register(proc.stdout, selectors.EVENT_READ, i)
            self.procs.append(proc)
            if i % 8 == 7:  # sshd's MaxStartups: not more than 10 unauthenticated at once
                self._wait_started(i + 1)
        self._wait_started(count)
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _wait_started(self, n: int, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while sum(1 for c in self.lines[:n] if c) < n:
            if time.monotonic() > deadline:
                raise farm.FarmError(f"only {sum(1 for c in self.lines if c)} of {n} streams started")
            self._read(0.2)

    def _read(self, timeout: float) -> None:
        for key, _ in self._selector.select(timeout):
            try:
                data = os.read(key.fd, 1 << 16)
            except BlockingIOError:
                continue
            if not data:
                self._selector.unregister(key.fileobj)
                continue
            self.lines[key.data] += data.count(b"\n")

    def _drain(self) -> None:
        while not self._stop:
            self._read(0.5)

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()  # the session ends as a dispatcher's would
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_agent(f: farm.Farm, b: farm.Builder, nixfarm: Path) -> subprocess.Popen[bytes]:
    """`nixfarm agent` of the given code in the builder, as root (as farm.start_agent)."""
    sock = b.root / "state" / "control.sock"
    sock.unlink(missing_ok=True)
    argv = [str(nixfarm), "--config", str(b.root / "agent.json"), "agent", "--interval", "1"]
    log = (b.root / "agent.log").open("ab")
    proc = subprocess.Popen(["nsenter", "-t", str(b.init_pid), "-m", "-n", "-p", "--", *argv],
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise farm.FarmError(f"agent did not start: {(b.root / 'agent.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return proc


def stop_agent(proc: subprocess.Popen[bytes]) -> None:
    pid = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
    os.kill(pid, 15)
    proc.wait(timeout=30)


def measure_streams(
    f: farm.Farm, b: farm.Builder, code: str, nixfarm: Path, count: int, window: float
) -> dict[str, Any]:
    """CPU and PSS of the builder's nixfarm processes and sshd, `count` streams of `code`."""
    agent = start_agent(f, b, nixfarm)
    try:
        streams = Streams(f, b, code, count)
        try:
            time.sleep(6)  # hand-overs done, first snapshots out
            before, lines_before, t0 = sample(b), list(streams.lines), time.monotonic()
            time.sleep(window)
            after, lines_after, t1 = sample(b), list(streams.lines), time.monotonic()
        finally:
            streams.close()
    finally:
        stop_agent(agent)
    result: dict[str, Any] = {"streams": count, "window_s": round(t1 - t0, 2)}
    for kind in ("nixfarm", "sshd", "shell"):
        pids = [p for p, (k, _, _) in after.items() if k == kind]
        ticks = sum(after[p][1] - before.get(p, (kind, after[p][1], 0))[1] for p in pids)
        pss = sum(after[p][2] for p in pids)
        result[kind] = {
            "processes": len(pids),
            "cpu_percent": 100 * ticks / TICK / (t1 - t0),
            "pss_mib": pss,
            "cpu_percent_per_stream": 100 * ticks / TICK / (t1 - t0) / count,
            "pss_mib_per_stream": pss / count,
        }
    got = [a - b for a, b in zip(lines_after, lines_before, strict=True)]
    result["lines_per_stream"] = {"min": min(got), "max": max(got), "expected": (t1 - t0) / INTERVAL}
    return result


def snapshot_cost(b: farm.Builder, tree: Path, as_user: bool, count: int) -> dict[str, Any]:
    """One Collector.snapshot() of the code in `tree`, inside the builder."""
    argv = [sys.executable, "-c", SNAPSHOT_CODE,
            str(tree), str(b.root / "agent.json"), str(count)]  # fmt: skip
    if as_user:
        argv = ["runuser", "-u", farm.BUILDER_USER, "--", *argv]
    snap: dict[str, Any] = json.loads(b.exec(argv, timeout=300).stdout)
    return snap


def spawn_idle(b: farm.Builder, count: int) -> list[str]:
    """Start `count` sleeping processes in the builder; their PIDs (the builder's view)."""
    return b.exec([sys.executable, "-c", SPAWN_CODE, str(count)], timeout=300).stdout.split()


def run(quick: bool, old_rev: str) -> dict[str, Any]:
    window = 10.0 if quick else 20.0
    sizes = (20, 100)
    snapshots = 30 if quick else 100
    machine = machine_info()
    others = other_farms("")
    results: dict[str, Any] = {"old_rev": old_rev, "interval_s": INTERVAL, "snapshot": {}, "streams": []}
    with farm.Farm() as f:
        f.add_client("new")
        f.add_client("old")
        b = f.add_builder("bench", clients={"new": "build"})
        trees = {"old": unpack(f, old_rev), "new": HERE.parent / "agent"}
        nixfarm = {"old": wrapper(f, "old", trees["old"]), "new": wrapper(f, "new", trees["new"])}
        pub = f.client_keys["old"].with_suffix(".pub").read_text().strip()
        with (b.root / "authorized_keys" / farm.BUILDER_USER).open("a") as keys:
            keys.write(f'restrict,command="{nixfarm["old"]} gateway --client old --role build" {pub}\n')
        for extra in (0, EXTRA_PROCESSES):
            pids: list[str] = []
            if extra:
                pids = spawn_idle(b, extra)
                time.sleep(12)  # older than ProcessTable.SETTLE: what an idle builder's processes are
            label = f"+{extra}" if extra else "own"
            procs = len(b.processes())
            results["snapshot"][label] = {
                "processes": procs,
                "old_as_builder_user": snapshot_cost(b, trees["old"], True, snapshots),
                "new_as_root": snapshot_cost(b, trees["new"], False, snapshots),
            }
            s = results["snapshot"][label]
            s["ratio"] = s["old_as_builder_user"]["median_ms"] / s["new_as_root"]["median_ms"]
            print(f"snapshot, {procs} processes: {s}", flush=True)
            for count in sizes:
                for code in ("old", "new"):
                    if code == "old" and extra and count > sizes[0]:
                        continue  # see the module docstring
                    m = measure_streams(f, b, code, nixfarm[code], count, window)
                    m.update(code=code, extra_processes=extra)
                    results["streams"].append(m)
                    print(json.dumps(m), flush=True)
            if pids:
                b.exec(["kill", *pids])
        others |= other_farms(f.id)
    check_clean(f.id)
    machine["other_farms_running"] = sorted(others)
    return {"machine": machine, "quick": quick, "farm_id": f.id, **results}


def print_table(results: dict[str, Any]) -> None:
    for label, s in results["snapshot"].items():
        print(f"snapshot ({s['processes']} processes): old {s['old_as_builder_user']['median_ms']:.2f} ms, "
              f"new {s['new_as_root']['median_ms']:.2f} ms, old/new {s['ratio']:.1f}x [{label}]")  # fmt: skip
    for m in results["streams"]:
        n, s = m["nixfarm"], m["sshd"]
        head = f"{m['code']:3} {m['streams']:3} streams +{m['extra_processes']:4}"
        print(
            f"{head}: nixfarm {n['cpu_percent']:5.1f}% {n['pss_mib']:6.1f} MiB ({n['processes']} procs); "
            f"sshd/conn {s['cpu_percent_per_stream']:.3f}% {s['pss_mib_per_stream']:.2f} MiB; "
            f"lines/stream {m['lines_per_stream']}"
        )


def default_old_rev() -> str:
    out = subprocess.run(["git", "-C", str(HERE.parent), "merge-base", "HEAD", "origin/main"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.strip()[:12]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 s windows instead of 20")
    parser.add_argument("--old-rev", help="the baseline's commit (default: merge-base with origin/main)")
    parser.add_argument("--json", metavar="OUT", type=Path, help="write every number to this file")
    args = parser.parse_args()
    results = run(args.quick, args.old_rev or default_old_rev())
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
