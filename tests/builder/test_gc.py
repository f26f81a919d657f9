"""Store GC on real harness builders: a tmpfs store that really fills up, real Nix GC."""

from __future__ import annotations

import fcntl
import json
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Client
from farm import Builder, Farm
from nix_root import NIX_VERSIONS

MiB = 1 << 20
LIMITS = {"min_free": "16M", "max_free": "32M"}


def free_bytes(b: Builder) -> int:
    out = b.exec(["stat", "-f", "-c", "%a %S", "/nix/store"]).stdout.split()
    return int(out[0]) * int(out[1])


def add_dead_paths(b: Builder, count: int, kib: int) -> list[str]:
    """Add `count` unrooted files of `kib` KiB to the builder's store (dead at once)."""
    tag = secrets.token_hex(4)
    script = (
        f"for i in $(seq {count}); do "
        f"dd if=/dev/urandom of=/tmp/nixfarm-gc-{tag}-$i bs=1024 count={kib} status=none; done; "
        f"nix-store --add /tmp/nixfarm-gc-{tag}-*; rm -f /tmp/nixfarm-gc-{tag}-*"
    )
    return b.exec(["sh", "-c", script]).stdout.split()


@pytest.fixture(params=NIX_VERSIONS, ids=lambda v: f"nix{v}")
def builder(farm: Farm, request: pytest.FixtureRequest) -> Builder:
    """The builder every test here runs on, once with each Nix (its GC, temproots and store)."""
    farm.add_client("alice")
    farm.add_client("ops")
    return farm.add_builder(
        "b1",
        clients={"alice": "build", "ops": "admin"},
        store_size="64m",
        agent_config=LIMITS,
        nix=request.param,
    )


def test_forty_4mib_builds_fit_a_64mib_store_only_with_the_agent(
    farm: Farm, builder: Builder, client: Client
) -> None:
    machines = builder.machines_line(farm.client_keys["alice"], max_jobs=4)

    without = client.build(machines, count=40, kib=4096)
    assert without.returncode != 0, "the workload must overflow the store without the agent"
    assert "No space left on device" in without.stderr

    builder.exec(["nix-store", "--gc"])  # start the second run from an empty store
    farm.start_agent(builder, "--interval", "1")
    with_agent = client.build(machines, count=40, kib=4096)

    assert with_agent.returncode == 0, with_agent.stderr[-3000:]
    assert len(with_agent.stdout.split()) == 40
    history = farm.ssh("ops", builder, "nixfarm gc --status --json")
    runs = json.loads(history.stdout)["history"]
    assert runs and all(r["error"] is None and r["reason"] == "below min-free" for r in runs)
    assert sum(r["bytes_freed"] for r in runs) >= 40 * 4 * MiB - 64 * MiB


def test_idle_builder_is_back_above_max_free_within_10_s(farm: Farm, builder: Builder) -> None:
    farm.start_agent(builder, "--interval", "1")
    add_dead_paths(builder, 12, 4096)  # 48 MiB of garbage in a 64 MiB store
    crossed = time.monotonic()
    assert free_bytes(builder) < 16 * MiB

    while free_bytes(builder) < 32 * MiB and time.monotonic() - crossed < 30:
        time.sleep(0.1)

    assert free_bytes(builder) >= 32 * MiB
    assert time.monotonic() - crossed <= 10


def test_nothing_live_goes_in_a_forced_pass_mid_build(
    farm: Farm, builder: Builder, client: Client, tmp_path: Path
) -> None:
    farm.start_agent(builder, "--interval", "1")
    rooted = add_dead_paths(builder, 1, 64)[0]
    builder.exec(["ln", "-s", rooted, "/nix/var/nix/gcroots/nixfarm-test-root"])
    garbage = add_dead_paths(builder, 4, 1024)
    nonce = secrets.token_hex(4)
    expr = tmp_path / "live.nix"
    expr.write_text(f"""
      let input = builtins.toFile "input-{nonce}" "needed by the build";
      in derivation {{
        name = "live-{nonce}"; system = builtins.currentSystem; builder = "/bin/sh";
        args = [ "-c" "/bin/sleep 6; /bin/cat ${{input}} > $out" ];
      }}
    """)
    argv = ["nix-build", str(expr), "--no-out-link", "--max-jobs", "0", "--builders",
            builder.machines_line(farm.client_keys["alice"])]  # fmt: skip
    build = subprocess.Popen(
        argv, env=client.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while "sleep 6" not in " ".join(cmd for _, cmd in builder.processes()):
            assert time.monotonic() < deadline and build.poll() is None, "the build never started"
            time.sleep(0.1)
        gc = farm.ssh("ops", builder, "nixfarm gc --now --target-free 64M --json")
    finally:
        stdout, stderr = build.communicate(timeout=60)

    assert gc.returncode == 0, gc.stderr
    result = json.loads(gc.stdout)["result"]
    assert result["error"] is None and result["deleted"] >= len(garbage)
    assert build.returncode == 0, stderr
    assert Path(stdout.strip()).read_text() == "needed by the build"
    store = builder.exec(["ls", "/nix/store"]).stdout.split()
    assert Path(rooted).name in store
    assert not any(Path(g).name in store for g in garbage)
    assert builder.exec(["nix-store", "--verify"]).returncode == 0


def test_two_passes_at_once_one_runs_the_other_says_so(farm: Farm, builder: Builder) -> None:
    farm.start_agent(builder, "--interval", "1")
    add_dead_paths(builder, 3, 1024)
    # Hold the machine's GC lock, as a running pass does.
    with open(builder.root / "state" / "gc.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        second = farm.ssh("ops", builder, "nixfarm gc --now")
    assert second.returncode == 0, second.stderr
    assert "a GC pass is already running" in second.stdout

    add_dead_paths(builder, 300, 1)
    first = subprocess.Popen(
        [*farm.ssh_argv("ops", builder), "nixfarm gc --now --target-free 64M --json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # Freeze the first pass inside its real `nix-store --delete`, so the second
    # request surely arrives while it runs, however loaded the machine is.
    deleting = wait_for_process(builder, "nix-store --delete")
    builder.exec(["kill", "-STOP", str(deleting)])
    try:
        again = farm.ssh("ops", builder, "nixfarm gc --now --json")
    finally:
        builder.exec(["kill", "-CONT", str(deleting)])
    out, err = first.communicate(timeout=120)

    assert json.loads(again.stdout)["event"] == "busy" and again.returncode == 0
    assert first.returncode == 0, err
    assert json.loads(out)["result"]["deleted"] >= 300


def wait_for_process(builder: Builder, needle: str, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, cmd in builder.processes():
            if needle in cmd:
                return pid
        time.sleep(0.01)
    raise AssertionError(f"no process {needle!r} on {builder.name}")


def test_sigterm_mid_pass_leaves_a_consistent_store_and_a_clean_restart(farm: Farm, builder: Builder) -> None:
    pid = farm.start_agent(builder, "--interval", "1")
    add_dead_paths(builder, 800, 1)
    pass_ = subprocess.Popen(
        [*farm.ssh_argv("ops", builder), "nixfarm gc --now --target-free 64M"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # SIGTERM arrives while the pass is inside a real `nix-store --delete`.
    deleting = wait_for_process(builder, "nix-store --delete")
    builder.exec(["kill", "-STOP", str(deleting)])
    subprocess.run(["kill", "-TERM", str(pid)], check=True)
    builder.exec(["kill", "-CONT", str(deleting)])
    assert farm.stop_agent(builder, pid) == 0
    pass_.communicate(timeout=60)
    verify = builder.exec(["nix-store", "--verify", "--check-contents"], check=False)
    assert verify.returncode == 0, verify.stderr
    assert "error" not in verify.stderr.lower()

    farm.start_agent(builder, "--interval", "1")
    done = farm.ssh("ops", builder, "nixfarm gc --now --target-free 64M --json")
    assert json.loads(done.stdout)["result"]["error"] is None


def test_corrupt_usage_records_are_rebuilt_with_a_warning(farm: Farm, builder: Builder) -> None:
    (builder.root / "state" / "usage.json").write_bytes(b"\x00{not json")
    farm.start_agent(builder, "--interval", "1")
    assert farm.ssh("ops", builder, "nixfarm gc --dry-run").returncode == 0
    log = (builder.root / "agent.log").read_text()
    assert "unreadable" in log and "starting them afresh" in log
    assert "Traceback" not in log


def test_gc_control_needs_the_admin_role_over_ssh(farm: Farm, builder: Builder) -> None:
    farm.start_agent(builder, "--interval", "1")
    refused = farm.ssh("alice", builder, "nixfarm gc --now")
    assert refused.returncode == 1
    assert "'nixfarm gc --now' needs the admin role; this key has the build role" in refused.stderr
    assert farm.ssh("alice", builder, "nixfarm gc --status").returncode == 0


def test_gc_now_without_an_agent_says_so(farm: Farm, builder: Builder) -> None:
    result = farm.ssh("ops", builder, "nixfarm gc --now")
    assert result.returncode == 1
    assert "the nixfarm agent is not running" in result.stderr
    assert result.stderr.count("\n") == 1


def test_inputs_of_running_builds_are_recorded_as_used(
    farm: Farm, builder: Builder, client: Client, tmp_path: Path
) -> None:
    farm.start_agent(builder, "--interval", "1")
    nonce = secrets.token_hex(4)
    expr = tmp_path / "uses.nix"
    expr.write_text(f"""
      let input = builtins.toFile "hot-{nonce}" "an input most builds need";
      in derivation {{
        name = "uses-{nonce}"; system = builtins.currentSystem; builder = "/bin/sh";
        args = [ "-c" "/bin/sleep 3; /bin/cat ${{input}} > $out" ];
      }}
    """)
    machines = builder.machines_line(farm.client_keys["alice"])
    argv = ["nix-build", str(expr), "--no-out-link", "--max-jobs", "0", "--builders", machines]
    built = subprocess.run(argv, env=client.env(), capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    cold = add_dead_paths(builder, 1, 4)[0]

    plan = json.loads(farm.ssh("ops", builder, "nixfarm gc --dry-run --target-free 64M --json").stdout)
    reasons = {Path(p["path"]).name.split("-", 1)[1]: p["reason"] for p in plan["result"]["plan"]}
    order = [Path(p["path"]).name.split("-", 1)[1] for p in plan["result"]["plan"]]
    assert reasons[f"hot-{nonce}"].startswith("last used")  # seen in the build's environment
    assert reasons[Path(cold).name.split("-", 1)[1]].startswith("never seen in use")
    assert order.index(Path(cold).name.split("-", 1)[1]) < order.index(f"hot-{nonce}")


def test_a_failing_nix_store_is_retried_with_backoff_not_in_a_loop(farm: Farm, builder: Builder) -> None:
    add_dead_paths(builder, 12, 4096)
    # A real Nix failure: its GC refuses to run while temproots is not a directory.
    builder.exec(
        [
            "sh",
            "-c",
            "mv /nix/var/nix/temproots /tmp/tr-$$ 2>/dev/null; echo x > /nix/var/nix/temproots",
        ]
    )
    farm.start_agent(builder, "--interval", "1")
    time.sleep(8)
    log = (builder.root / "agent.log").read_text()
    failures = log.count("GC pass failed")
    assert 1 <= failures <= 2, log  # at 0 s and after 5 s; the next waits 10 s
    # Each Nix words it its own way: 2.8 checks the path, 2.26 fails to create the directory.
    error = {"2.8": "is not a directory", "2.26": "creating directory '/nix/var/nix/temproots'"}[builder.nix]
    assert "retry in 5 s" in log and error in log, log
    state = json.loads(farm.ssh("ops", builder, "nixfarm gc --status --json").stdout)
    assert error in state["history"][-1]["error"]

    builder.exec(["sh", "-c", "rm /nix/var/nix/temproots; mkdir /nix/var/nix/temproots"])
    deadline = time.monotonic() + 25
    while free_bytes(builder) < 32 * MiB:
        assert time.monotonic() < deadline, "the agent never recovered"
        time.sleep(0.2)
