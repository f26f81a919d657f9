"""Benchmarks of the builder-side agent, each against a baseline taken in the same run.

    .venv/bin/python bench/bench_agent.py [--quick] [--json OUT]

a. gateway overhead: ssh start -> first 16 bytes of the Nix worker protocol
   handshake, through `nixfarm gateway` vs a plain `nix-daemon --stdio` key.
b. metrics cost: one in-process `Collector.snapshot()`, and a fresh
   `ssh ... nixfarm metrics --json`.
c. resident memory of `nixfarm stream` on a builder vs an idle python process
   started the same way (a forced ssh command).

Uses one harness builder (tests/farm.py) and tears it down on exit. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from runinfo import check_clean, machine_info, other_farms  # noqa: E402

import farm  # noqa: E402
from nixfarm.builder.config import AgentConfig  # noqa: E402
from nixfarm.builder.metrics import Collector  # noqa: E402

WORKER_MAGIC_1 = 0x6E697863
WORKER_MAGIC_2 = 0x6478696F
NIX_DAEMON = "/usr/bin/nix-daemon"
STREAM_INTERVAL = 0.2
WARMUPS = 3


# -- statistics ------------------------------------------------------------


def summary(samples: list[float]) -> dict[str, float]:
    """Median and p90 (inclusive quantiles) of samples in seconds, as milliseconds."""
    ms = [s * 1000 for s in samples]
    return {
        "median_ms": statistics.median(ms),
        "p90_ms": statistics.quantiles(ms, n=10, method="inclusive")[-1],
        "n": len(ms),
    }


# -- a. gateway overhead ---------------------------------------------------


def handshake_time(argv: list[str]) -> float:
    """Seconds from starting ssh to reading WORKER_MAGIC_2 and the protocol version."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    reply = b""
    try:
        proc.stdin.write(struct.pack("<Q", WORKER_MAGIC_1))
        proc.stdin.flush()
        while len(reply) < 16:
            chunk = os.read(proc.stdout.fileno(), 16 - len(reply))
            if not chunk:
                break
            reply += chunk
        elapsed = time.perf_counter() - start
    finally:
        stderr = finish(proc)
    if len(reply) < 16:
        raise farm.FarmError(f"handshake cut short after {reply!r}: {stderr}")
    magic, _version = struct.unpack("<QQ", reply)
    if magic != WORKER_MAGIC_2:
        raise farm.FarmError(f"unexpected reply magic {magic:#x}")
    return elapsed


def finish(proc: subprocess.Popen[bytes], timeout: float = 10) -> str:
    """Close the session's stdin, wait for ssh to exit (kill it if it hangs); its stderr."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return (err or b"").decode(errors="replace")


def bench_gateway(f: farm.Farm, b: farm.Builder, trials: int) -> dict[str, Any]:
    """Handshakes through the gateway (installed, and the dev venv's editable install)
    and with a plain key, interleaved after warm-ups; medians, p90s and ratios."""
    argv = {
        "gateway": [*f.ssh_argv("gw", b), "nix-daemon --stdio"],
        "gateway_editable": [*f.ssh_argv("gwdev", b), "nix-daemon --stdio"],
        "plain": [*f.ssh_argv("plain", b), "nix-daemon --stdio"],
    }
    for _ in range(WARMUPS):
        for a in argv.values():
            handshake_time(a)
    times: dict[str, list[float]] = {name: [] for name in argv}
    names = list(argv)
    for i in range(trials):
        for name in names[i % 3 :] + names[: i % 3]:  # rotate the order: no position bias
            times[name].append(handshake_time(argv[name]))
    stats = {name: summary(t) for name, t in times.items()}
    plain = stats["plain"]["median_ms"]
    return {
        **stats,
        "ratio": stats["gateway"]["median_ms"] / plain,
        "added_ms": stats["gateway"]["median_ms"] - plain,
        "editable_ratio": stats["gateway_editable"]["median_ms"] / plain,
        "editable_added_ms": stats["gateway_editable"]["median_ms"] - plain,
    }


def install_nixfarm(root: Path) -> Path:
    """A plain (non-editable) install of the agent in its own venv, as a package has it.

    The dev venv's editable install adds an import finder (~9 ms at start-up)
    that no real installation has; the gateway is measured both ways.
    """
    venv = root / "installed-venv"
    wheels = root / "wheels"
    agent = HERE.parent / "agent"
    # Build the wheel with the dev venv's pip (it has a build backend at hand),
    # then install it into a plain venv, offline, with no editable finder.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(agent)],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    wheel = [str(w) for w in wheels.glob("*.whl")]
    subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", "--no-deps", "--no-index", *wheel],
        check=True, capture_output=True,
    )  # fmt: skip
    return venv / "bin/nixfarm"


# -- b. metrics cost -------------------------------------------------------


def bench_snapshot(count: int) -> dict[str, Any]:
    """Wall time of one in-process Collector.snapshot() on this host."""
    collector = Collector(AgentConfig(store_dir="/nix/store"))
    try:
        for _ in range(10):
            collector.snapshot()
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            collector.snapshot()
            samples.append(time.perf_counter() - start)
    finally:
        collector.close()
    return summary(samples)


def fresh_metrics_time(f: farm.Farm, b: farm.Builder) -> float:
    """Seconds for one `ssh builder nixfarm metrics --json`, checked to return a snapshot."""
    start = time.perf_counter()
    result = f.ssh("gwdev", b, "nixfarm metrics --json")
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise farm.FarmError(f"nixfarm metrics failed ({result.returncode}): {result.stderr}")
    json.loads(result.stdout)
    return elapsed


def bench_metrics(f: farm.Farm, b: farm.Builder, trials: int, snapshots: int) -> dict[str, Any]:
    """In-process snapshot vs a fresh ssh `nixfarm metrics --json`, and their ratio."""
    in_process = bench_snapshot(snapshots)
    for _ in range(WARMUPS):
        fresh_metrics_time(f, b)
    fresh = summary([fresh_metrics_time(f, b) for _ in range(trials)])
    return {
        "in_process": in_process,
        "fresh_ssh": fresh,
        "ratio": fresh["median_ms"] / in_process["median_ms"],
    }


# -- c. resident memory ----------------------------------------------------


def rss_of(b: farm.Builder, pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a builder process, in MiB."""
    status = b.exec(["cat", f"/proc/{pid}/status"]).stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def find_process(b: farm.Builder, needle: str) -> int:
    """PID (in the builder) of the one non-shell process whose command line contains needle."""
    shells = {"sh", "dash", "bash"}
    found = [
        pid for pid, args in b.processes()
        if needle in args and Path(args.split()[0]).name.lstrip("-") not in shells
    ]  # fmt: skip
    if len(found) != 1:
        raise farm.FarmError(f"expected one process matching {needle!r}, found {found}")
    return found[0]


def drain_lines(proc: subprocess.Popen[bytes], seconds: float) -> int:
    """Read the stream's lines for `seconds` (so it never blocks on a full pipe); count them."""
    assert proc.stdout is not None
    lines = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not proc.stdout.readline():
            raise farm.FarmError("stream ended early")
        lines += 1
    return lines


def bench_memory(f: farm.Farm, b: farm.Builder, settle: float = 3.0) -> dict[str, Any]:
    """RSS of `nixfarm stream` after `settle` s vs an idle python started by sshd the same way."""
    stream = subprocess.Popen(
        [*f.ssh_argv("gwdev", b), f"nixfarm stream --interval {STREAM_INTERVAL}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        lines = drain_lines(stream, settle)
        stream_rss = rss_of(b, find_process(b, "nixfarm gateway"))
    finally:
        finish(stream)
    idle = subprocess.Popen(
        [*f.ssh_argv("idle", b)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(settle)
        idle_rss = rss_of(b, find_process(b, "time.sleep"))
    finally:
        finish(idle)
    return {
        "stream": stream_rss,
        "stream_lines_seen": lines,
        "baseline_python": idle_rss,
        "ratio": stream_rss["VmRSS"] / idle_rss["VmRSS"],
        "added_mib": stream_rss["VmRSS"] - idle_rss["VmRSS"],
    }


# -- setup and report ------------------------------------------------------


def add_forced_key(f: farm.Farm, b: farm.Builder, client: str, command: str) -> None:
    """Append an authorized_keys line for `client` with a forced command other than the gateway."""
    pub = f.client_keys[client].with_suffix(".pub").read_text().strip()
    with (b.root / "authorized_keys" / farm.BUILDER_USER).open("a") as keys:
        keys.write(f'restrict,command="{command}" {pub}\n')


def print_table(results: dict[str, Any]) -> None:
    """A short human-readable table of the results and their targets."""
    g, m, r = results["gateway"], results["metrics"], results["memory"]

    def ms(d: dict[str, float], digits: int = 1) -> tuple[str, str]:
        return f"{d['median_ms']:.{digits}f} ms", f"p90 {d['p90_ms']:.{digits}f} ms"

    rows = [
        ("a. handshake via gateway", *ms(g["gateway"])),
        ("   via gateway, editable dev", *ms(g["gateway_editable"])),
        ("   handshake, plain key", *ms(g["plain"])),
        (
            "   ratio, added",
            f"{g['ratio']:.2f}x",
            f"+{g['added_ms']:.1f} ms (target <1.10x or <30 ms)",
        ),
        (
            "   ratio, added (editable)",
            f"{g['editable_ratio']:.2f}x",
            f"+{g['editable_added_ms']:.1f} ms",
        ),
        ("b. snapshot in-process", *ms(m["in_process"], 2)),
        ("   fresh ssh metrics --json", *ms(m["fresh_ssh"])),
        ("   ratio fresh/in-process", f"{m['ratio']:.0f}x", "(target: snapshot <5 ms)"),
        ("c. stream RSS", f"{r['stream']['VmRSS']:.1f} MiB", "(target <40 MiB)"),
        ("   idle python RSS", f"{r['baseline_python']['VmRSS']:.1f} MiB", ""),
        ("   ratio, added", f"{r['ratio']:.2f}x", f"+{r['added_mib']:.1f} MiB"),
    ]
    for name, value, note in rows:
        print(f"{name:<30} {value:>10}  {note}")


def run(quick: bool) -> dict[str, Any]:
    """Start one builder, run the three benchmarks, close the farm."""
    trials = 10 if quick else 30
    snapshots = 50 if quick else 200
    machine = machine_info()
    others = other_farms("")
    with farm.Farm() as f:
        for client in ("gw", "gwdev", "plain", "idle"):
            f.add_client(client)
        b = f.add_builder("bench", clients={"gwdev": "build"})
        installed = install_nixfarm(f.root)
        add_forced_key(f, b, "gw", f"{installed} gateway --client gw --role build")
        add_forced_key(f, b, "plain", f"{NIX_DAEMON} --stdio")
        add_forced_key(f, b, "idle", f"{f.python} -c 'import time; time.sleep(5)'")
        results = {
            "gateway": bench_gateway(f, b, trials),
            "metrics": bench_metrics(f, b, trials, snapshots),
            "memory": bench_memory(f, b),
        }
        others |= other_farms(f.id)
    check_clean(f.id)
    machine["other_farms_running"] = sorted(others)  # they share the 2 cores: noisier numbers
    return {"machine": machine, "quick": quick, "farm_id": f.id, **results}


def main() -> int:
    """Parse arguments, run, print the table and optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials (10 instead of 30)")
    parser.add_argument("--json", metavar="OUT", type=Path, help="write every number to this file")
    args = parser.parse_args()
    results = run(args.quick)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
