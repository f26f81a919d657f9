"""Scheduling benchmark: static machines files (nix.dev) against `nixfarm dispatch`.

    .venv/bin/python bench/bench_dispatch.py [--quick] [--reps N] [--json OUT]
        [--scenarios parallel,dies,long_first,farm_full] [--strategies static,dispatch+mux]

One harness farm (tests/farm.py): three builders with 4, 2 and 1 slots
(emulated cores: every build holds one of its builder's slot tokens while it
works, bench/sched.nix) and three clients. Scenarios, each run with every
strategy back to back in the same farm (order reversed every other repetition):

  parallel    each client sends 12 independent builds of 2 s at once
  dies        the same, and the 4-slot builder dies (its sshd is killed) 3 s in;
              each client reruns its nix-build once if builds failed, as a user
              or CI job would
  long_first  one client sends 4 builds of 20 s, 3 s later the two others send
              6 builds of 2 s each; what counts is how long those two wait
  farm_full   one client fills all 7 slots with builds of 10 s, 4 s later
              another sends 2 builds of 2 s; what counts is how long it waits

Strategies:

  static      every client lists every builder with maxJobs = its slots, in a
              machines file written once (the nix.dev "distributed builds" way)
  dispatch    one `nixfarm dispatch` per client, with its own inventory and
              machines file; the builds use `--builders @MACHINES` and
              build-poll-interval = 1, as the NixOS client module sets them
  +pollN      (either) the clients' build-poll-interval is N s instead of
              static's 5 (Nix's default) or dispatch's 1 (the dispatchers are
              told, with --build-poll-interval)
  +intervalS  (dispatch) the dispatchers' stream interval is S s instead of 1
  +revREV     (dispatch) the dispatchers run the agent code of git commit REV
              (the builders keep this tree's): two versions compared in one run
  +mux        (either) each client's ssh shares one connection per builder
              (ControlMaster), as the client module's connectionSharing does:
              dispatch+mux is nixfarm as the NixOS client module sets it up

Each client is its own Nix store (`--store local?root=...`), so it has its own
/nix/var/nix/current-load, as separate client machines do: Nix counts a
builder's load from the lock files there, and clients sharing one directory
would see each other's builds, which real clients never do.

Every output records when its build started on the builder, when it got a
slot and when it finished (bench/sched.nix), so the script reports how many
builds queued on a full builder and for how long. A run that does not finish
in time is stopped and reported with what its nix-builds were doing.
Other harness farms share the 2 CPUs: before each run the script waits for
them (--max-wait) and records those it ran alongside. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from runinfo import check_clean, machine_info, other_farms  # noqa: E402

import farm  # noqa: E402
from conftest import Client  # noqa: E402

SCHED_NIX = HERE / "sched.nix"
BUILDERS = {"big": 4, "medium": 2, "small": 1}  # name -> slots (emulated cores)
CLIENTS = ("alice", "bob", "carol")
DISPATCH_TIMING = ["--interval", "1", "--keepalive", "1", "--backoff-base", "2"]
QUEUED = 0.25  # waiting longer than this for a slot (tokens are polled every 0.05 s) = queued
SAMPLE_EVERY = 0.2  # seconds between samples of the machines files and dispatcher status


# -- scenarios -------------------------------------------------------------


@dataclass
class Batch:
    """One nix-build: `count` builds of `seconds` each, sent by `client` at `at` s."""

    client: str
    count: int
    seconds: int
    at: float = 0.0


@dataclass
class Scenario:
    """What the clients send, and whether the biggest builder dies (at `kill_at` s)."""

    name: str
    batches: list[Batch]
    kill_at: float | None = None
    retry: bool = False  # rerun a client's nix-build once if some of its builds failed
    measured: tuple[str, ...] = CLIENTS  # the clients whose wait the scenario is about
    timeout: float = 90.0  # past this the run is stopped and reported as stuck

    @property
    def work(self) -> float:
        return sum(b.count * b.seconds for b in self.batches if b.client in self.measured)

    def lower_bound(self) -> float:
        """Seconds no schedule can beat, measured from the first measured batch's submission."""
        slots = sum(BUILDERS.values())
        longest = max(b.seconds for b in self.batches if b.client in self.measured)
        if self.name == "farm_full":
            # The late client's builds can start when the first long build ends.
            first, late = self.batches
            return first.seconds + late.seconds - late.at
        if self.name == "long_first":
            # The long builds hold 4 slots all along; the short ones share the other 3.
            return max(longest, self.work / (slots - 4))
        if self.kill_at is not None:
            # Continuous bound: all 7 slots until the death, the 3 others after it.
            left = max(0.0, self.work - slots * self.kill_at)
            return self.kill_at + left / (slots - BUILDERS["big"])
        return max(longest, self.work / slots)


def scenarios(names: list[str]) -> list[Scenario]:
    """The scenarios to run, by name, in the order given."""
    parallel = [Batch(c, 12, 2) for c in CLIENTS]
    known = {
        "parallel": Scenario("parallel", parallel),
        "dies": Scenario("dies", parallel, kill_at=3.0, retry=True),
        "long_first": Scenario(
            "long_first",
            [Batch("alice", 4, 20), Batch("bob", 6, 2, at=3.0), Batch("carol", 6, 2, at=3.0)],
            measured=("bob", "carol"),
        ),
        "farm_full": Scenario(
            "farm_full",
            [Batch("alice", 7, 10), Batch("bob", 2, 2, at=4.0)],
            measured=("bob",),
            timeout=45.0,
        ),
    }
    return [known[n] for n in names]


# -- the farm --------------------------------------------------------------


def start_farm(f: farm.Farm) -> dict[str, farm.Builder]:
    """Three clients, and three builders with 4, 2 and 1 slots that all of them may use."""
    for client in CLIENTS:
        f.add_client(client)
    roles = dict.fromkeys(CLIENTS, "build")
    builders = {
        name: f.add_builder(
            name, clients=roles, max_jobs=slots, slots=slots, store_size="128m", agent_config={"min_free": 0}
        )
        for name, slots in BUILDERS.items()
    }
    # Each builder runs the agent service, as in production (its GC off: the
    # stores never fill here). Its record of the builds that finished there
    # lasts from one run to the next, as on a farm in use.
    for b in builders.values():
        f.start_agent(b, "--interval", "1")
    return builders


def client_dir(f: farm.Farm, client: str) -> Path:
    return f.root / "clients" / client


def client_store(f: farm.Farm, client: str) -> Path:
    """The root of the client's own Nix store (own current-load, as a separate machine)."""
    return client_dir(f, client) / "store"


def wait_for_quiet(own_id: str, max_wait: float) -> tuple[float, list[str]]:
    """Wait until no other harness farm runs, at most `max_wait` s: (seconds waited, others left)."""
    start = time.monotonic()
    others = other_farms(own_id)
    while others and time.monotonic() - start < max_wait:
        time.sleep(5)
        others = other_farms(own_id)
    waited = time.monotonic() - start
    if others:
        print(f"  running anyway after {waited:.0f} s, alongside {', '.join(sorted(others))}", flush=True)
    elif waited > 1:
        print(f"  waited {waited:.0f} s for other farms to finish", flush=True)
    return waited, sorted(others)


def builder_idle(b: farm.Builder) -> bool:
    """True when none of the builder's slot tokens is held (no build works there)."""
    script = 'for s in /nix/var/nixfarm-slots/*; do /usr/bin/flock -n "$s" true || exit 1; done'
    return b.exec(["/bin/sh", "-c", script], check=False).returncode == 0


def wait_idle(builders: dict[str, farm.Builder], timeout: float = 60) -> None:
    """Wait until every builder is idle (builds of the previous run are gone)."""
    deadline = time.monotonic() + timeout
    while not all(builder_idle(b) for b in builders.values()):
        if time.monotonic() > deadline:
            raise farm.FarmError("builders still busy 60 s after a run")
        time.sleep(0.2)


def kill_builder(b: farm.Builder) -> None:
    """The builder dies for its clients: its sshd (listener and every session) is killed."""
    b.exec(["pkill", "-x", "sshd"], check=False)


def revive_builder(f: farm.Farm, b: farm.Builder, timeout: float = 30) -> None:
    """Start the builder's sshd again and wait until a client gets in."""
    f.restart_sshd(b)
    deadline = time.monotonic() + timeout
    while f.ssh(CLIENTS[0], b, "nixfarm metrics --json", timeout=10).returncode != 0:
        if time.monotonic() > deadline:
            raise farm.FarmError(f"{b.name} did not come back")
        time.sleep(0.2)


# -- machines files --------------------------------------------------------


def write_static(f: farm.Farm, builders: dict[str, farm.Builder], client: str) -> Path:
    """The nix.dev machines file: every builder, maxJobs = its slots; written once."""
    path = client_dir(f, client) / "machines-static"
    key = f.client_keys[client]
    path.write_text("".join(b.machines_line(key, max_jobs=BUILDERS[n]) + "\n" for n, b in builders.items()))
    return path


class Dispatchers:
    """One `nixfarm dispatch` per client, each with its own inventory and machines file."""

    def __init__(
        self,
        f: farm.Farm,
        builders: dict[str, farm.Builder],
        poll: int,
        interval: float | None = None,
        rev: str | None = None,
    ) -> None:
        self.machines: dict[str, Path] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        for client in CLIENTS:
            inventory = f.write_inventory(client, list(builders.values()))
            # A degraded builder is listed with the inventory's static values: its slots.
            data = json.loads(inventory.read_text())
            for entry in data["builders"]:
                entry["max_jobs"] = BUILDERS[entry["name"]]
            inventory.write_text(json.dumps(data, indent=2))
            machines = client_dir(f, client) / "machines"
            machines.unlink(missing_ok=True)
            argv = [*nixfarm_at(f, rev), "dispatch", "--inventory", str(inventory)]
            argv += ["--machines", str(machines)]
            argv += ["--build-poll-interval", str(poll)]
            argv += ["--current-load", str(client_store(f, client) / "nix/var/nix/current-load")]
            self.logs[client] = client_dir(f, client) / "dispatch.log"
            with self.logs[client].open("ab") as log:
                self.procs[client] = subprocess.Popen(
                    [*argv, *DISPATCH_TIMING, *(["--interval", f"{interval:g}"] if interval else [])],
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            self.machines[client] = machines

    def wait_all_listed(self, count: int, timeout: float = 30) -> float:
        """Seconds until every client's machines file lists `count` builders."""
        start = time.monotonic()
        while not all(len(machines_lines(p)) == count for p in self.machines.values()):
            for client, proc in self.procs.items():
                if proc.poll() is not None:
                    raise farm.FarmError(
                        f"dispatcher of {client} exited: {self.logs[client].read_text()[-2000:]}"
                    )
            if time.monotonic() - start > timeout:
                raise farm.FarmError(f"dispatchers did not list {count} builders within {timeout} s")
            time.sleep(0.05)
        return time.monotonic() - start

    def stop(self) -> None:
        """SIGTERM every dispatcher and wait; a non-zero exit is reported, not fatal."""
        for proc in self.procs.values():
            proc.terminate()
        for client, proc in self.procs.items():
            if proc.wait(timeout=15) != 0:
                print(f"  dispatcher of {client} exited {proc.returncode}", file=sys.stderr)


def nixfarm_at(f: farm.Farm, rev: str | None) -> list[str]:
    """The argv prefix that runs `nixfarm` from this tree, or from git commit `rev`
    (its agent/ unpacked once per farm; this venv's dependencies)."""
    if rev is None:
        return [f.nixfarm]
    tree = f.root / f"agent-{rev}"
    if not tree.exists():
        archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", rev, "agent"],
                                 capture_output=True, check=True).stdout  # fmt: skip
        tree.mkdir()
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    code = "import sys; sys.path.insert(0, sys.argv.pop(1)); from nixfarm.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, str(tree / "agent")]


def machines_lines(path: Path) -> list[list[str]]:
    """The builder lines of a machines file, split into fields (none if it is missing)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]


class Sampler:
    """Records, on every change, what each client's Nix sees (builder -> maxJobs, speedFactor)
    and, for dispatchers, the slots each holds back and each builder's active builds and
    sessions per client as reported."""

    def __init__(self, machines: dict[str, Path], names: dict[str, str], t0: float, status: bool) -> None:
        self.machines, self.names, self.t0, self.status = machines, names, t0, status
        self.timeline: list[dict[str, Any]] = []
        self._last: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self, client: str, path: Path) -> dict[str, Any]:
        seen = {}
        for fields in machines_lines(path):
            address = fields[0].rsplit("@", 1)[-1]
            seen[self.names.get(address, address)] = [int(fields[3]), int(fields[4])]
        loads: dict[str, Any] = {}
        if not self.status:
            return {"lines": seen, "status": loads}
        try:
            status = json.loads((path.parent / "dispatch-status.json").read_text())
            for b in status["builders"]:
                builds = (b.get("snapshot") or {}).get("builds") or {}
                loads[b["name"]] = {
                    "state": b["state"],
                    "held_back": b.get("held_back"),
                    "active": builds.get("active"),
                    "sessions": builds.get("sessions_by_client", {}),
                }
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return {"lines": seen, "status": loads}

    def _run(self) -> None:
        while not self._stop.is_set():
            for client, path in self.machines.items():
                sample = self._sample(client, path)
                if sample != self._last.get(client):
                    self._last[client] = sample
                    self.timeline.append({"t": round(time.time() - self.t0, 2), "client": client, **sample})
            self._stop.wait(SAMPLE_EVERY)

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join()
        return self.timeline


# -- builds ----------------------------------------------------------------


@dataclass
class Build:
    """One finished build, times in seconds since the run started."""

    client: str
    index: int
    builder: str
    started: float  # the build process started on the builder
    got_slot: float
    finished: float
    slot: str

    @property
    def queued(self) -> float:
        return self.got_slot - self.started


@dataclass
class Attempt:
    """One nix-build of a batch."""

    batch: Batch
    nonce: str
    argv: list[str]
    proc: subprocess.Popen[str]
    started: float
    log: Path
    retry: bool = False
    ended: float | None = None
    returncode: int | None = None
    stderr: str = ""
    # Per build: "ok" (has its output), "failed" (Nix reported it failed) or "not built"
    # (neither: still waiting for a machine when the run was stopped).
    outcome: list[str] = field(default_factory=list)


def build_argv(f: farm.Farm, batch: Batch, machines: Path, nonce: str, poll: int | None) -> list[str]:
    """nix-build bench/sched.nix with only remote builders, in the client's own store.

    --keep-going so that when a builder dies every build is still tried and
    each failure is counted (without it Nix stops at the first one).
    `poll` sets build-poll-interval: how often Nix asks its build hook again
    about builds it postponed (default 5 s).
    """
    poll_option = ["--option", "build-poll-interval", str(poll)] if poll else []
    return [
        "nix-build",
        str(SCHED_NIX),
        "--no-out-link",
        "--keep-going",
        "--max-jobs",
        "0",
        "--builders",
        f"@{machines}",
        "--store",
        f"local?root={client_store(f, batch.client)}",
        "--argstr",
        "nonce",
        nonce,
        "--arg",
        "count",
        str(batch.count),
        "--arg",
        "seconds",
        str(batch.seconds),
        *poll_option,
    ]


def out_paths(f: farm.Farm, batch: Batch, nonce: str) -> list[str]:
    """The output paths of a batch's builds, in order (evaluation only)."""
    expr = (
        f'map (d: d.outPath) (import {SCHED_NIX} {{ nonce = "{nonce}"; '
        f"count = {batch.count}; seconds = {batch.seconds}; }})"
    )
    out = farm.run(["nix-instantiate", "--eval", "--strict", "--json", "--expr", expr])
    return list(json.loads(out.stdout))


def read_outputs(f: farm.Farm, batch: Batch, paths: list[str], t0: float) -> dict[int, Build]:
    """The builds of a batch that produced an output, by index."""
    root = client_store(f, batch.client)
    found = {}
    for i, path in enumerate(paths):
        try:
            host, started, got, finished, slot = Path(f"{root}{path}").read_text().split()
        except FileNotFoundError:
            continue
        found[i] = Build(
            batch.client, i, host, float(started) - t0, float(got) - t0, float(finished) - t0, slot
        )
    return found


@dataclass
class Strategy:
    """How the clients get their machines files, and the experimental variations."""

    base: str  # "static" or "dispatch"
    poll: int | None = None  # the clients' build-poll-interval (None: the strategy's own)
    interval: float | None = None  # the dispatchers' stream interval (None: DISPATCH_TIMING's)
    rev: str | None = None  # the git commit whose agent code the dispatchers run (None: this tree)
    mux: bool = False  # the clients' ssh shares one connection per builder (ControlMaster)


def parse_strategy(name: str) -> Strategy:
    """ "static" or "dispatch" (the strategies compared), optionally with "+" options:

    +pollN   the clients' build-poll-interval is N s (how often Nix asks its
             build hook again about a build it postponed; Nix's default is 5)
    +intervalS  the dispatchers' stream interval is S s (dispatch only)
    +revREV  the dispatchers run the agent code of git commit REV (dispatch only)
    +mux     the clients' ssh keeps one connection per builder and runs each
             build's session over it (ControlMaster, ControlPersist), one
             master per client, as separate client machines would have
    """
    base, *options = name.split("+")
    strategy = Strategy(base)
    for option in options:
        if option.startswith("poll") and option[4:].isdigit():
            strategy.poll = int(option[4:])
        elif option.startswith("rev") and re.fullmatch(r"[0-9a-f]{7,40}", option[3:]):
            strategy.rev = option[3:]
        elif option == "mux":
            strategy.mux = True
        elif option.startswith("interval") and _is_seconds(option[8:]):
            strategy.interval = float(option[8:])
        else:
            raise SystemExit(f"unknown option {option!r} in strategy {name!r}")
    if base not in ("static", "dispatch"):
        raise SystemExit(f"unknown strategy {name!r}: static or dispatch, optionally +pollN")
    return strategy


def _is_seconds(text: str) -> bool:
    try:
        return 0.05 <= float(text) <= 60
    except ValueError:
        return False


def run_strategy(
    f: farm.Farm, builders: dict[str, farm.Builder], scenario: Scenario, strategy: str
) -> dict[str, Any]:
    """Run one scenario with one strategy; the builders are idle and alive before and after."""
    how = parse_strategy(strategy)
    # static: Nix's default (5 s); dispatch: what the client module sets (1 s).
    poll = how.poll if how.poll is not None else (1 if how.base == "dispatch" else None)
    dispatchers = None
    if how.base == "static":
        machines = {c: write_static(f, builders, c) for c in CLIENTS}
        listed_after = 0.0
    else:
        dispatchers = Dispatchers(f, builders, poll or 1, how.interval, how.rev)
        machines = dispatchers.machines
        listed_after = dispatchers.wait_all_listed(len(builders))
        time.sleep(2)  # a few snapshots of idle builders, as a running service would have
    env = Client(f.root).env()
    # +mux: each client's ssh shares one connection per builder, as connectionSharing does.
    envs = {c: {**env, "NIX_SSHOPTS": f.shared_ssh_options(c)} if how.mux else env for c in CLIENTS}
    nonces = {id(b): f"{f.id}{secrets.token_hex(3)}" for b in scenario.batches}
    paths = {id(b): out_paths(f, b, nonces[id(b)]) for b in scenario.batches}
    names = {b.address: n for n, b in builders.items()}
    t0 = time.time()
    sampler = Sampler(machines, names, t0, status=dispatchers is not None)
    attempts: list[Attempt] = []
    pending = sorted(scenario.batches, key=lambda b: b.at)
    killed_at = None
    timed_out = False
    stuck: list[dict[str, Any]] = []
    try:
        while pending or any(a.ended is None for a in attempts):
            now = time.time() - t0
            while pending and pending[0].at <= now:
                batch = pending.pop(0)
                attempt = start_attempt(
                    f, batch, machines[batch.client], nonces[id(batch)], envs[batch.client], t0, poll
                )
                attempts.append(attempt)
            if scenario.kill_at is not None and killed_at is None and now >= scenario.kill_at:
                kill_builder(builders["big"])
                killed_at = time.time() - t0
            for a in list(attempts):
                if a.ended is None and a.proc.poll() is not None:
                    finish_attempt(f, a, paths[id(a.batch)], t0)
                    if a.returncode and scenario.retry and not a.retry:
                        again = start_attempt(
                            f, a.batch, machines[a.batch.client], a.nonce, envs[a.batch.client], t0, poll
                        )
                        again.retry = True
                        attempts.append(again)
            if now > scenario.timeout:
                print(
                    f"  {scenario.name}/{strategy}: not done after {scenario.timeout:.0f} s, stopped",
                    flush=True,
                )
                timed_out = True
                stuck = [stuck_report(a) for a in attempts if a.proc.poll() is None]
                break
            time.sleep(0.05)
    finally:
        for a in attempts:
            if a.proc.poll() is None:
                os.killpg(a.proc.pid, signal.SIGKILL)
                a.proc.wait()
                finish_attempt(f, a, paths[id(a.batch)], t0)
        timeline = sampler.stop()
        if dispatchers:
            dispatchers.stop()
        if killed_at is not None:
            revive_builder(f, builders["big"])
        wait_idle(builders)
    builds = [b for batch in scenario.batches for b in read_outputs(f, batch, paths[id(batch)], t0).values()]
    result = summarize(scenario, strategy, attempts, builds, killed_at, listed_after, timeline)
    result["timed_out"] = timed_out
    # Builds that neither finished nor failed: their nix-build still waited for a machine.
    result["not_built_when_stopped"] = sum(
        a.outcome.count("not built") for a in attempts if a.ended is not None
    )
    if stuck:
        result["stuck"] = stuck
    return result


def stuck_report(a: Attempt) -> dict[str, Any]:
    """What a nix-build that does not finish is doing: it and its children (the build
    hooks, each in a session of its own), and the end of its log."""
    pid = str(a.proc.pid)
    ps = ["ps", "-ww", "-o", "pid,ppid,stat,etimes,args", "--pid", pid, "--ppid", pid]
    return {
        "client": a.batch.client,
        "processes": subprocess.run(ps, capture_output=True, text=True).stdout.splitlines(),
        "log_tail": a.log.read_text(errors="replace")[-3000:],
    }


def start_attempt(
    f: farm.Farm, batch: Batch, machines: Path, nonce: str, env: dict[str, str], t0: float, poll: int | None
) -> Attempt:
    """Start a batch's nix-build; its log goes to a file (a pipe nobody reads would block it)."""
    argv = build_argv(f, batch, machines, nonce, poll)
    log = client_dir(f, batch.client) / f"nix-build-{nonce}-{secrets.token_hex(2)}.log"
    with log.open("w") as stderr:
        # Its own process group, to kill a stuck one whole (its build hooks end with it).
        proc = subprocess.Popen(
            argv, env=env, text=True, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
    return Attempt(batch, nonce, argv, proc, time.time() - t0, log=log)


def finish_attempt(f: farm.Farm, a: Attempt, paths: list[str], t0: float) -> None:
    """Record when and how a nix-build ended, and which of its builds have an output now."""
    a.ended = time.time() - t0
    a.returncode = a.proc.wait()
    a.stderr = a.log.read_text(errors="replace")
    done = read_outputs(f, a.batch, paths, t0)
    failed = {int(i) for i in re.findall(rf"builder for '[^']*-sched-{a.nonce}-(\d+)\.drv' failed", a.stderr)}
    a.outcome = [
        "ok" if i in done else "failed" if i in failed else "not built" for i in range(a.batch.count)
    ]


# -- results ---------------------------------------------------------------


def idle_while_waiting(attempts: list[Attempt], builds: list[Build], step: float = 0.05) -> float:
    """Slot-seconds that builders sat idle while some build had been sent but not started anywhere.

    A build is waiting on its client from its nix-build's start until it starts
    on a builder (Nix places one build at a time, and postpones those it finds
    no machine for). Idle slots meanwhile are capacity the schedule wasted.
    """
    sent: dict[tuple[str, int], float] = {}  # (client, index) -> when the nix-build that built it started
    for a in attempts:  # in start order: a rerun only counts for what the first attempt did not build
        for i, outcome in enumerate(a.outcome):
            if outcome == "ok":
                sent.setdefault((a.batch.client, i), a.started)
    waiting = [(sent[b.client, b.index], b.started) for b in builds if (b.client, b.index) in sent]
    if not waiting:
        return 0.0
    idle, t, end = 0.0, min(w[0] for w in waiting), max(w[1] for w in waiting)
    while t < end:
        if any(s <= t < e for s, e in waiting):
            busy = {n: 0 for n in BUILDERS}
            for b in builds:
                if b.got_slot <= t < b.finished:
                    busy[b.builder] += 1
            idle += sum(max(0, slots - busy[n]) for n, slots in BUILDERS.items()) * step
        t += step
    return idle


def summarize(
    scenario: Scenario,
    strategy: str,
    attempts: list[Attempt],
    builds: list[Build],
    killed_at: float | None,
    listed_after: float,
    timeline: list[dict[str, Any]],
) -> dict[str, Any]:
    """The numbers of one run: makespan, waits, queueing, failures, placement."""
    measured = [a for a in attempts if a.batch.client in scenario.measured]
    first = [a for a in measured if not a.retry]
    submitted = min(a.started for a in first)
    end_first = max(a.ended or 0.0 for a in first) - submitted
    end_all = max(a.ended or 0.0 for a in measured) - submitted
    bound = scenario.lower_bound()
    queued = [b for b in builds if b.queued > QUEUED]
    # With a dead builder the killed builds left no record of the slots they held: not computed.
    idle = None if scenario.kill_at is not None else round(idle_while_waiting(attempts, builds), 1)
    result: dict[str, Any] = {
        "strategy": strategy,
        "makespan_seconds": round(end_first, 2),
        "lower_bound_seconds": round(bound, 2),
        "ratio_to_lower_bound": round(end_all / bound, 3),  # all built, reruns included
        "clients": {
            a.batch.client + (" (rerun)" if a.retry else ""): {
                "submitted": round(a.started, 2),
                "ended": round(a.ended or 0.0, 2),
                "wait_seconds": round((a.ended or 0.0) - a.started, 2),
                "builds": a.batch.count,
                "failed": a.outcome.count("failed"),
                "not_built": a.outcome.count("not built"),
                "returncode": a.returncode,
                **({"stderr_tail": a.stderr[-1500:]} if a.returncode else {}),
            }
            for a in attempts
        },
        "builds_per_builder": {n: sum(1 for b in builds if b.builder == n) for n in BUILDERS},
        "queued_builds": len(queued),
        "queued_builds_per_builder": {n: sum(1 for b in queued if b.builder == n) for n in BUILDERS},
        "queued_seconds_total": round(sum(b.queued for b in builds), 1),
        "queued_seconds_max": round(max((b.queued for b in builds), default=0.0), 2),
        "idle_slot_seconds_while_builds_wait_on_clients": idle,
        "builds": [
            asdict(b) | {"queued": round(b.queued, 2)} for b in sorted(builds, key=lambda b: b.started)
        ],
        "machines_timeline": timeline,
    }
    if strategy.startswith("dispatch"):
        result["dispatchers_listed_all_after_seconds"] = round(listed_after, 2)
    if scenario.measured != CLIENTS:
        result["wait_seconds"] = {a.batch.client: round((a.ended or 0.0) - a.started, 2) for a in first}
    if scenario.kill_at is not None:
        result |= {
            "killed_at": round(killed_at or 0.0, 2),
            "failed_builds": sum(a.outcome.count("failed") for a in first),
            "failed_after_rerun": sum(a.outcome.count("failed") for a in measured if a.retry),
            "all_built_seconds": round(end_all, 2),
        }
    return result


def add_time_lost(rep: dict[str, dict[str, Any]]) -> None:
    """For `dies`: time lost against the same strategy's healthy `parallel` run of this repetition."""
    dies, healthy = rep.get("dies"), rep.get("parallel")
    if not dies or not healthy:
        return
    for strategy, result in dies.items():
        base = healthy.get(strategy)
        if base is None or result["timed_out"] or base["timed_out"]:
            result["time_lost_seconds"] = None  # stuck: the time lost is unbounded
            continue
        result["time_lost_seconds"] = round(result["all_built_seconds"] - base["makespan_seconds"], 2)


def print_run(name: str, r: dict[str, Any]) -> None:
    """One line per run, as it finishes."""
    if r["timed_out"]:
        stopped, waiting = r["makespan_seconds"], r["not_built_when_stopped"]
        line = f"STUCK: stopped at {stopped:.0f} s, {waiting} builds never started"
        if "failed_builds" in r:
            line += f", {r['failed_builds']} failed"
    elif "failed_builds" in r:
        line = (
            f"failed {r['failed_builds']}, first attempt done {r['makespan_seconds']:.2f} s, "
            f"all built (reruns) {r['all_built_seconds']:.2f} s"
        )
    else:
        line = f"makespan {r['makespan_seconds']:.2f} s"
    if not r["timed_out"]:
        line += f" ({r['ratio_to_lower_bound']:.2f}x of {r['lower_bound_seconds']:.2f} s)"
    line += f", queued {r['queued_builds']} builds / {r['queued_seconds_total']:.0f} s"
    if "wait_seconds" in r:
        line += ", waits " + ", ".join(f"{c} {w:.1f} s" for c, w in r["wait_seconds"].items())
    print(f"  {name:<10} {r['strategy']:<14} {line}", flush=True)


def summary_table(reps: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per scenario and strategy: the numbers of every repetition, and their mean where all
    repetitions finished (a stuck run has no makespan to average)."""
    out: dict[str, Any] = {}
    keys = (
        "timed_out",
        "makespan_seconds",
        "ratio_to_lower_bound",
        "queued_builds",
        "queued_seconds_total",
        "idle_slot_seconds_while_builds_wait_on_clients",
        "failed_builds",
        "not_built_when_stopped",
        "all_built_seconds",
        "time_lost_seconds",
        "wait_seconds",
    )
    for rep in reps:
        for name, by_strategy in rep.items():
            for strategy, r in by_strategy.items():
                entry = out.setdefault(name, {}).setdefault(
                    strategy, {"lower_bound_seconds": r["lower_bound_seconds"]}
                )
                for key in keys:
                    if key in r:
                        entry.setdefault(key, []).append(r[key])
    for by_strategy in out.values():
        for entry in by_strategy.values():
            if any(entry["timed_out"]):
                continue
            for key in keys:
                values = entry.get(key, [])
                if values and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                    entry[f"{key}_mean"] = round(statistics.fmean(values), 3)
    return out


def run(names: list[str], strategies: list[str], reps: int, max_wait: float) -> dict[str, Any]:
    """Start the farm, run every scenario `reps` times with both strategies, close the farm."""
    machine = machine_info()
    results: list[dict[str, dict[str, Any]]] = []
    with farm.Farm() as f:
        builders = start_farm(f)
        for rep in range(reps):
            order = strategies if rep % 2 == 0 else strategies[::-1]
            results.append({})
            for scenario in scenarios(names):
                for strategy in order:
                    print(f"rep {rep + 1}: {scenario.name}, {strategy}", flush=True)
                    waited, others = wait_for_quiet(f.id, max_wait)
                    r = run_strategy(f, builders, scenario, strategy)
                    r["rep"], r["order"] = rep + 1, order
                    r["waited_for_other_farms_seconds"] = round(waited, 1)
                    r["other_farms_running"] = sorted(set(others) | other_farms(f.id))
                    results[-1].setdefault(scenario.name, {})[strategy] = r
                    print_run(scenario.name, r)
            add_time_lost(results[-1])
        farm_id = f.id
    check_clean(farm_id)
    return {
        "machine": machine,
        "farm_id": farm_id,
        "config": {
            "builders": BUILDERS,
            "clients": list(CLIENTS),
            "strategies": strategies,
            "dispatch_timing": DISPATCH_TIMING,
            "queued_threshold_seconds": QUEUED,
            "scenarios": [asdict(s) for s in scenarios(names)],
        },
        "summary": summary_table(results),
        "repetitions": results,
    }


def to_json(value: Any, level: int = 0, key: str = "") -> str:
    """JSON, indented, but one line per build and per timeline sample: the files stay
    readable and a few hundred KiB instead of a few MiB."""
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {to_json(v, level + 1, str(k))}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and value:
        if key in ("builds", "machines_timeline"):
            return "[\n" + ",\n".join(inner + json.dumps(v) for v in value) + f"\n{pad}]"
        return "[\n" + ",\n".join(inner + to_json(v, level + 1) for v in value) + f"\n{pad}]"
    return json.dumps(value)


def main() -> int:
    """Parse arguments, run, print a line per run and optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition of parallel and dies")
    parser.add_argument("--reps", type=int, default=2, help="repetitions (default 2)")
    parser.add_argument(
        "--scenarios",
        default="parallel,dies,long_first,farm_full",
        help="comma-separated: parallel, dies, long_first, farm_full (default all)",
    )
    parser.add_argument(
        "--strategies",
        default="static,dispatch+mux",
        help="comma-separated, run in this order (reversed every other repetition): static or "
        "dispatch, each with +options (module docstring) (default static,dispatch+mux: nixfarm as the "
        "client module sets it up)",
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=600,
        help="seconds to wait for other harness farms to finish before each run (default 600)",
    )
    parser.add_argument("--json", metavar="OUT", type=Path, help="write every number to this file")
    args = parser.parse_args()
    names = args.scenarios.split(",")
    reps = args.reps
    if args.quick:
        names, reps = [n for n in names if n in ("parallel", "dies")], 1
    strategies = args.strategies.split(",")
    for strategy in strategies:
        parse_strategy(strategy)
    results = run(names, strategies, reps, args.max_wait)
    results["quick"] = args.quick
    if args.json:
        args.json.write_text(to_json(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
