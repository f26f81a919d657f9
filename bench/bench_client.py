"""What a client pays to follow a big farm: the real dispatcher, simulated builders.

    .venv/bin/python bench/bench_client.py [--quick] [--builders N] [--old-rev REV] [--json OUT]

300 builders of up to 64 slots (`--builders`), each a session of one
local SSH server (asyncssh, a separate process, not measured) that answers
`nixfarm stream --interval S` with a snapshot every S seconds, each builder
at a phase of its own (as independent agents would be): its load moves
(a random walk of running builds, other clients' sessions and demand), so
the dispatcher's allowances and held slots change as they would. The
dispatcher is the real `nixfarm dispatch`, with its own machines file and
current-load directory, at its default interval (2 s): once the code of
git commit REV (default: where this branch left main), once this tree's,
one after the other in the same run. Measured over a window once every
builder is healthy: its CPU (% of one core), PSS, open files and its
holds' files; then `nixfarm status --json`, `nixfarm status` (the table)
and `nixfarm status --watch` (for the window) against its status file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import pty
import random
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from runinfo import machine_info  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
CLIENT = "bench"


# -- the simulated builders ----------------------------------------------------


def snapshot(name: str, max_jobs: int, rng: random.Random, state: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 snapshot of a builder whose load moves a little every time."""
    # Random walks: the builds running there, and each other client's sessions and builds waiting.
    state["active"] = max(0, min(max_jobs + 4, state["active"] + rng.randint(-2, 2)))
    for key in ("sessions", "demand"):
        state[key] = [max(0, n + rng.choice((-1, 0, 0, 0, 1))) for n in state[key]]
    others = {f"c{i}": n for i, n in enumerate(state["sessions"]) if n}
    return {
        "schema": 1,
        "agent_version": "sim",
        "hostname": name,
        "timestamp": time.time(),
        "systems": ["x86_64-linux"],
        "features": [],
        "cpus": max_jobs,
        "load": {"avg1": 1.0, "avg5": 1.0, "avg15": 1.0},
        "psi": None,
        "memory": {"total_bytes": 1 << 36, "available_bytes": 1 << 35},
        "store": {
            "path": "/nix/store",
            "free_bytes": 1 << 40,
            "total_bytes": 1 << 41,
            "free_inodes": 1 << 30,
            "total_inodes": 1 << 31,
        },
        "nix_daemon_memory": {
            "source": None,
            "cgroup": None,
            "current_bytes": None,
            "max_bytes": None,
            "oom_kills": None,
            "error": "simulated",
        },
        "builds": {
            "active": state["active"],
            "ages_seconds": sorted(
                (round(rng.uniform(0, 600), 2) for _ in range(state["active"])), reverse=True
            ),
            "finished": [[round(rng.uniform(0, 600), 2), round(rng.uniform(1, 300), 2)] for _ in range(8)],
            "sessions_by_client": others,
            "demand_by_client": {f"c{i}": n for i, n in enumerate(state["demand"])},
        },
        "nix_config": {"max_jobs": max_jobs, "cores": 1, "min_free_bytes": 1 << 30, "max_free_bytes": None},
        "network": None,
        "gc": {
            "running": False,
            "last_run": None,
            "bytes_freed": None,
            "duration_seconds": None,
            "error": None,
            "min_free_bytes": 1 << 30,
            "max_free_bytes": None,
        },
    }


async def serve(port_file: str, host_key: str, slots: str) -> None:
    """An SSH server for every simulated builder: the user name says which (b<i>)."""
    import asyncssh
    from asyncssh.connection import SSHConnection
    from asyncssh.constants import MSG_IGNORE

    # asyncssh puts an empty SSH_MSG_IGNORE before every packet it encrypts; OpenSSH's
    # sshd, which real builders run, does not. Left in, the dispatcher would decrypt two
    # packets per snapshot here where it decrypts one from a real builder.
    send_packet = SSHConnection.send_packet

    def send_without_ignore(self: SSHConnection, pkttype: int, *args: bytes, **kwargs: Any) -> None:
        if pkttype != MSG_IGNORE:
            send_packet(self, pkttype, *args, **kwargs)

    SSHConnection.send_packet = send_without_ignore  # type: ignore[method-assign]

    sizes = [int(s) for s in slots.split(",")]

    async def session(process: asyncssh.SSHServerProcess[bytes]) -> None:
        words = (process.command or "").split()
        user = process.get_extra_info("username")
        index = int(user[1:])
        rng = random.Random(index)
        interval = float(words[words.index("--interval") + 1]) if "--interval" in words else 5.0
        clients = rng.randint(0, 6)  # other clients using this builder
        state = {"active": rng.randint(0, sizes[index]), "sessions": [rng.randint(0, 4)] * clients,
                 "demand": [rng.randint(0, 2)] * clients}  # fmt: skip

        async def drain() -> None:  # the dispatcher's `demand N` lines
            while await process.stdin.read(4096):
                pass

        reader = asyncio.create_task(drain())
        try:
            phase = rng.uniform(0, interval)  # real builders' agents tick each on its own
            while not reader.done():
                line = json.dumps(snapshot(user, sizes[index], rng, state)).encode() + b"\n"
                process.stdout.write(line)
                await asyncio.sleep(interval + phase)
                phase = 0.0
        except (OSError, asyncssh.Error):
            pass
        process.exit(0)

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return True

        def public_key_auth_supported(self) -> bool:
            return True

        def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
            return True

    server = await asyncssh.create_server(Server, "127.0.0.1", 0, server_host_keys=[host_key],
                                          process_factory=session, encoding=None)  # fmt: skip
    port = server.sockets[0].getsockname()[1]
    Path(port_file).write_text(str(port))
    await asyncio.Event().wait()


# -- the dispatcher ------------------------------------------------------------


def write_inventory(root: Path, port: int, host_pub: str, key: Path, sizes: list[int]) -> Path:
    inventory = {
        "client": {"name": CLIENT, "key_file": str(key)},
        "builders": [
            {"name": f"sim{i:03}", "host_name": f"sim{i:03}.example", "address": "127.0.0.1", "port": port,
             "protocol": "ssh-ng", "ssh_user": f"b{i}", "systems": ["x86_64-linux"], "features": [],
             "mandatory_features": [], "host_key": host_pub, "max_jobs": size, "speed_factor": 1}
            for i, size in enumerate(sizes)
        ],
    }  # fmt: skip
    path = root / "inventory.json"
    path.write_text(json.dumps(inventory))
    return path


def nixfarm_argv(root: Path, rev: str | None) -> list[str]:
    """`nixfarm` from this tree, or from git commit `rev` (its agent/ unpacked; this venv)."""
    source = HERE.parent / "agent"
    if rev is not None:
        tree = root / f"agent-{rev}"
        archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", rev, "agent"],
                                 capture_output=True, check=True).stdout  # fmt: skip
        tree.mkdir()
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        source = tree / "agent"
    code = "import sys; sys.path.insert(0, sys.argv.pop(1)); from nixfarm.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, str(source)]


# --profile: the dispatcher profiles itself from SIGUSR1 to SIGUSR2 (the measured window), in
# CPU time: a read of /proc/locks waits for the kernel, which wall time would count as work.
PROFILED = """import cProfile, signal, sys, time
sys.path.insert(0, sys.argv.pop(1))
out, profile = sys.argv.pop(1), cProfile.Profile(time.process_time)
signal.signal(signal.SIGUSR1, lambda *_: profile.enable())
signal.signal(signal.SIGUSR2, lambda *_: (profile.disable(), profile.dump_stats(out)))
from nixfarm.cli import main
sys.exit(main())
"""


def profiled(argv: list[str], out: Path) -> list[str]:
    """The same `nixfarm` (nixfarm_argv()), under cProfile over the measured window only."""
    return [argv[0], "-c", PROFILED, argv[-1], str(out)]


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def memory(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("Rss", "Pss"):
            out[key.lower() + "_mib"] = int(line.split()[1]) / 1024
    return out


def run_dispatcher(
    root: Path,
    argv: list[str],
    inventory: Path,
    count: int,
    window: float,
    extra: list[str],
    profile: bool = False,
) -> dict[str, Any]:
    """Start a dispatcher, wait until every builder is healthy, measure over `window` s."""
    work = Path(tempfile.mkdtemp(dir=root))
    machines, load = work / "machines", work / "current-load"
    log = (work / "dispatch.log").open("wb")
    command = [*argv, "dispatch", "--inventory", str(inventory), "--machines", str(machines)]
    proc = subprocess.Popen(
        [*command, "--current-load", str(load), *extra], stdout=log, stderr=subprocess.STDOUT
    )
    status_file = work / "dispatch-status.json"
    try:
        started = time.monotonic()
        while True:
            healthy = 0
            if status_file.exists():
                try:
                    status = json.loads(status_file.read_text())
                    healthy = sum(b["state"] == "healthy" for b in status["builders"])
                except ValueError:
                    pass
            if healthy == count:
                break
            if proc.poll() is not None or time.monotonic() - started > 300:
                raise RuntimeError(
                    f"{healthy} of {count} healthy: {(work / 'dispatch.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
        connected_s = time.monotonic() - started
        time.sleep(5)
        if profile:
            proc.send_signal(signal.SIGUSR1)
        t0, c0 = time.monotonic(), cpu_ticks(proc.pid)
        time.sleep(window)
        t1, c1 = time.monotonic(), cpu_ticks(proc.pid)
        if profile:
            proc.send_signal(signal.SIGUSR2)
        result: dict[str, Any] = {
            "builders": count,
            "connected_s": round(connected_s, 1),
            "window_s": round(t1 - t0, 2),
            "cpu_percent": 100 * (c1 - c0) / TICK / (t1 - t0),
            **memory(proc.pid),
            "open_files": len(os.listdir(f"/proc/{proc.pid}/fd")),
            "fd_soft_limit": int(
                next(
                    line.split()[3]
                    for line in Path(f"/proc/{proc.pid}/limits").read_text().splitlines()
                    if line.startswith("Max open files")
                )
            ),
            "lock_files": len(os.listdir(load)),
            "status_file_bytes": status_file.stat().st_size,
        }
        result["status"] = measure_status(argv, machines, window)
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure_status(argv: list[str], machines: Path, window: float) -> dict[str, Any]:
    """`nixfarm status` once as JSON, once as the table, and --watch for `window` s."""
    out: dict[str, Any] = {}
    for name, extra in (("json", ["--json"]), ("table", [])):
        start = time.monotonic()
        proc = subprocess.Popen([*argv, "status", "--machines", str(machines), *extra],
                                stdout=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out[name] = {
            "wall_s": round(time.monotonic() - start, 3),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "max_rss_mib": usage.ru_maxrss / 1024,
            "exit": proc.returncode,
        }
    # --watch in a terminal (a pty of 200 x 50, drained), as a person runs it: rich draws only there.
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen([*argv, "status", "--watch", "--machines", str(machines)],
                            stdin=slave, stdout=slave, stderr=slave)  # fmt: skip
    os.close(slave)
    drained = threading.Thread(target=_drain, args=(master,), daemon=True)
    drained.start()
    time.sleep(3)
    t0, c0 = time.monotonic(), cpu_ticks(proc.pid)
    time.sleep(window)
    t1, c1 = time.monotonic(), cpu_ticks(proc.pid)
    out["watch"] = {"cpu_percent": 100 * (c1 - c0) / TICK / (t1 - t0), **memory(proc.pid)}
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=10)
    os.close(master)
    return out


def _drain(fd: int) -> None:
    with contextlib.suppress(OSError):
        while os.read(fd, 1 << 16):
            pass


def default_old_rev() -> str:
    out = subprocess.run(["git", "-C", str(HERE.parent), "merge-base", "HEAD", "origin/main"],
                         capture_output=True, text=True)  # fmt: skip
    if out.returncode != 0:
        sys.exit(f"bench_client: no baseline: {out.stderr.strip()}; name one with --old-rev REV")
    return out.stdout.strip()[:12]


CODES = ("old", "new", "old-nix-names", "new-nix-names")


def run(
    counts: list[int], window: float, old_rev: str, codes: list[str], profile: Path | None = None
) -> dict[str, Any]:
    """For each farm size, the old dispatcher then the new one, against the same simulated builders."""
    rng = random.Random(20261207)
    sizes = [rng.choice([8, 16, 32, 48, 64, 64]) for _ in range(max(counts))]
    results: dict[str, Any] = {"old_rev": old_rev, "slots": sizes, "runs": []}
    with tempfile.TemporaryDirectory(prefix="nixfarm-bench-client-") as tmp:
        root = Path(tmp)
        for name in ("host", "client"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True
            )
        port_file = root / "port"
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file), str(root / "host"),
                                   ",".join(map(str, sizes))], stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            while not port_file.exists():
                time.sleep(0.1)
            host_pub = " ".join((root / "host.pub").read_text().split()[:2])
            code_argv = {"old": nixfarm_argv(root, old_rev), "new": nixfarm_argv(root, None)}
            # "-nix-names": as the client module runs it for CppNix.
            argv = {code: code_argv[code.split("-")[0]] for code in codes}
            extra = {code: ["--lock-names", "nix"] for code in codes if code.endswith("-nix-names")}
            for count in counts:
                inventory = write_inventory(
                    root, int(port_file.read_text()), host_pub, root / "client", sizes[:count]
                )
                run: dict[str, Any] = {"builders": count}
                for code in argv:
                    try:
                        out = profile / f"dispatch-{code}-{count}.prof" if profile else None
                        command = profiled(argv[code], out) if out else argv[code]
                        run[code] = run_dispatcher(
                            root, command, inventory, count, window, extra.get(code, []), out is not None
                        )
                    except RuntimeError as e:  # the old one runs out of open files at 300 builders
                        run[code] = {"failed": str(e).strip().splitlines()[-1][-300:]}
                    print(code, count, json.dumps(run[code]), flush=True)
                for old, new in (("old", "new"), ("old-nix-names", "new-nix-names")):
                    if "cpu_percent" in run.get(old, {}) and "cpu_percent" in run.get(new, {}):
                        run[f"ratios{old[3:]}"] = {
                            key: run[new][key] / run[old][key]
                            for key in ("cpu_percent", "pss_mib", "open_files")
                        }
                results["runs"].append(run)
        finally:
            server.kill()
            server.wait()
    return results


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        asyncio.run(serve(*sys.argv[2:]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="15 s windows instead of 30")
    parser.add_argument("--builders", default="100,300", help="farm sizes, comma-separated (default 100,300)")
    parser.add_argument("--old-rev", help="the baseline's commit (default: merge-base with origin/main)")
    parser.add_argument("--codes", default="old,new,new-nix-names",
                        help=f"what runs, in order, of {','.join(CODES)} (default: the first 3)")  # fmt: skip
    parser.add_argument("--profile", metavar="DIR", type=Path,
                        help="profile each dispatcher over its window (cProfile: its CPU is then not "
                        "comparable) into DIR/dispatch-<code>-<builders>.prof")  # fmt: skip
    parser.add_argument("--json", metavar="OUT", type=Path, help="write every number to this file")
    args = parser.parse_args()
    counts = [int(n) for n in args.builders.split(",")]
    codes = args.codes.split(",")
    if not set(codes) <= set(CODES):
        parser.error(f"--codes: of {', '.join(CODES)}")
    window = 15.0 if args.quick else 30.0
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)  # the dispatcher writes into it, silently
    results = run(counts, window, args.old_rev or default_old_rev(), codes, args.profile)
    results = {"machine": machine_info(), "quick": args.quick, "profiled": bool(args.profile), **results}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
