"""The agent under a real systemd (booted by tests/systemd_host.py on this machine).

1. `nixfarm agent` as the NixOS module's unit (Type=notify, WatchdogSec): it is
   active only after READY=1, and a frozen agent is killed and restarted.
2. Its log lines and the gateway's decisions reach the journal with fields.
3. `nixfarm metrics` reads nix-daemon.service's memory through pydbus, and the
   values are what `systemctl show` prints.
4. nix-daemon.service's memory cap, for real: a build that allocates past it is
   OOM-killed, nix-daemon survives, the agent counts the kill, and the next
   build succeeds.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, BinaryIO

from systemd_host import (
    CGROUP_ROOT,
    REPO,
    SystemdHost,
    wait_for,
)
from systemd_host import (
    systemd_host_fixture as systemd_host_fixture,  # the fixture, used by its name
)

AGENT_UNIT = "nixfarm-agent.service"
AGENT_CONFIG = "/etc/nixfarm/agent.json"
AGENT_SERVICE_NIX = REPO / "modules" / "agent-service.nix"
# nixpkgs is not reachable here, so the module gets a stand-in for the few lib
# functions it uses (the real lib where NIXPKGS points to a checkout).
UNIT_EXPR = """
{ module, nixpkgs }:
let
  stand-in = rec {
    getExe = _: "/usr/local/bin/nixfarm";
    escapeShellArg = arg:
      let s = toString arg; in
      if builtins.match "[[:alnum:],._+:@%/-]+" s != null then s
      else "'" + builtins.replaceStrings [ "'" ] [ "'\\\\''" ] s + "'";
    escapeShellArgs = args: builtins.concatStringsSep " " (map escapeShellArg args);
  };
  lib = if nixpkgs == "" then stand-in else (import (nixpkgs + "/lib")) // {
    inherit (stand-in) getExe;
  };
in
import module {
  inherit lib;
  package = null;
  nixPackage = "/usr"; # Debian's nix-bin: nix-store in /usr/bin inside the host
  agentInterval = 1;
  configFile = "/etc/nixfarm/agent.json";
  restartTriggers = [ ];
}
"""
# The module derives WatchdogSec from the interval (4 * 1 + 20 = 24 s) and waits
# 5 s before a restart; shorter here, so a frozen agent is caught in seconds.
AGENT_DROP_IN = """\
[Service]
WatchdogSec=3s
RestartSec=1s
"""
DAEMON_DROP_IN = "/etc/systemd/system/nix-daemon.service.d/50-nixfarm.conf"
# systemd moves MemoryCurrent by a few pages between two reads of an idle daemon.
MEMORY_TOLERANCE = 1 << 20


def agent_unit_text() -> str:
    """nixfarm-agent.service as NixOS writes it from modules/agent-service.nix."""
    nix = shutil.which("nix-instantiate")
    assert nix, "nix-instantiate is needed to render modules/agent-service.nix (tests/run)"
    r = subprocess.run(
        [nix, "--eval", "--strict", "--json", "--expr", UNIT_EXPR,
         "--argstr", "module", str(AGENT_SERVICE_NIX),
         "--argstr", "nixpkgs", os.environ.get("NIXPKGS", "")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, f"cannot evaluate {AGENT_SERVICE_NIX}:\n{r.stderr}"
    unit = json.loads(r.stdout)
    lines = ["[Unit]", f"Description={unit['description']}"]
    for key in ("wants", "after"):
        if unit.get(key):
            lines.append(f"{key.capitalize()}={' '.join(unit[key])}")
    lines.append("[Service]")
    for name, value in unit.get("environment", {}).items():
        lines.append(f'Environment="{name}={value}"')
    for key, value in unit["serviceConfig"].items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key}={systemd_value(item)}")
    return "\n".join(lines) + "\n"


def systemd_value(value: Any) -> str:
    """A unit-file value as NixOS's systemd library writes one (lists: a line each)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def install_agent(host: SystemdHost, config: dict[str, Any]) -> None:
    """Write the agent's unit, test drop-in and config into the host; daemon-reload."""
    host.write(AGENT_CONFIG, json.dumps(config))
    host.write(f"/etc/systemd/system/{AGENT_UNIT}", agent_unit_text())
    host.write(f"/etc/systemd/system/{AGENT_UNIT}.d/50-test.conf", AGENT_DROP_IN)
    host.systemctl("daemon-reload")
    # A test before may have left it failed, or used up its start rate limit.
    host.systemctl("reset-failed", AGENT_UNIT, check=False)


def set_daemon_limits(host: SystemdHost, memory_max: str, memory_high: str, tasks: int) -> None:
    """nix-daemon.service with the serviceConfig keys modules/builder.nix sets; restarted."""
    host.write(
        DAEMON_DROP_IN,
        "[Service]\n"
        "MemoryAccounting=true\n"
        f"MemoryMax={memory_max}\n"
        f"MemoryHigh={memory_high}\n"
        "OOMScoreAdjust=500\n"
        f"TasksMax={tasks}\n",
    )
    host.systemctl("daemon-reload")
    host.systemctl("restart", "nix-daemon.service")


def metrics(host: SystemdHost) -> dict[str, Any]:
    """One `nixfarm metrics --json` snapshot taken inside the host."""
    r = host.run(["nixfarm", "metrics", "--json"])
    snapshot: dict[str, Any] = json.loads(r.stdout)
    return snapshot


def nix_build(host: SystemdHost, name: str, script: str) -> subprocess.CompletedProcess[str]:
    """nix-build a /bin/sh derivation inside the host, through nix-daemon.service.

    NIX_REMOTE=daemon: as root nix-build would otherwise build in-process, in
    our cgroup; through the daemon the build runs in nix-daemon.service's.
    """
    expr = (
        f'derivation {{ name = "{name}"; system = builtins.currentSystem; '
        f'builder = "/bin/sh"; args = [ "-c" {json.dumps(script)} ]; }}'
    )
    return host.run(
        ["nix-build", "--no-out-link", "-E", expr],
        check=False,
        timeout=120,
        env={"NIX_REMOTE": "daemon"},
    )


def open_fifo_writer(fifo: Path) -> BinaryIO | None:
    """A write end of `fifo` once a reader has it open (the agent, blocked in open())."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: no reader yet
        return None
    return os.fdopen(fd, "wb", buffering=0)


def daemon_oom_kills_from_kernel(control_group: str) -> int:
    """The kernel's OOM-kill count of a unit's memory cgroup (v1 memory.oom_control or
    v2 memory.events), read here, independently of the agent."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        path = CGROUP_ROOT / control_group.lstrip("/") / "memory.events"
    else:
        path = CGROUP_ROOT / "memory" / control_group.lstrip("/") / "memory.oom_control"
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    raise AssertionError(f"no oom_kill in {path}")


def test_agent_is_active_only_after_ready_and_the_watchdog_restarts_it(
    systemd_host: SystemdHost,
) -> None:
    host = systemd_host
    # The agent sends READY=1 after its first snapshot, which reads nix.conf.
    # Here nix.conf is a FIFO, so that first snapshot blocks in open() until
    # the test writes to it: the only way to hold the real agent before READY=1
    # without a hook in its code. What this proves: while the agent's process
    # runs without having sent READY=1, systemd keeps the unit "activating";
    # it turns "active" once the snapshot completes and READY=1 follows.
    gate = "/run/nixfarm-test-gate"
    fifo = host.path(gate) / "nix.conf"
    shutil.rmtree(fifo.parent, ignore_errors=True)
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    install_agent(host, {"nix_conf_dir": gate})
    host.systemctl("start", "--no-block", AGENT_UNIT)
    writer = wait_for("the agent to open nix.conf for its first snapshot",
                      lambda: open_fifo_writer(fifo), 30)  # fmt: skip
    try:
        held = host.show(AGENT_UNIT, "ActiveState", "SubState", "MainPID")
        assert (held["ActiveState"], held["SubState"]) == ("activating", "start"), held
        assert held["MainPID"] != "0"
        time.sleep(1)
        assert host.show(AGENT_UNIT, "ActiveState")["ActiveState"] == "activating"
        # Later snapshots open nix.conf again: they get a regular file. The
        # agent's open FIFO is unaffected by the rename.
        (fifo.parent / "nix.conf.new").write_text("max-jobs = 2\n")
        os.rename(fifo.parent / "nix.conf.new", fifo)
        writer.write(b"max-jobs = 2\n")
    finally:
        writer.close()
    wait_for(
        "the agent to become active after READY=1",
        lambda: host.show(AGENT_UNIT, "ActiveState")["ActiveState"] == "active",
        20,
    )
    ready = host.show(AGENT_UNIT, "MainPID", "NRestarts", "StatusText")
    assert ready["MainPID"] == held["MainPID"]  # the same process, not a restart
    assert ready["StatusText"].startswith("store "), ready  # its STATUS= line arrived too

    # Freeze it: no more WATCHDOG=1. systemd must kill it (SIGABRT, the
    # default WatchdogSignal) after WatchdogSec and start it again.
    cursor = host.journal_cursor()
    host.systemctl("kill", "--signal=SIGSTOP", "--kill-who=main", AGENT_UNIT)

    def restarted() -> dict[str, str] | None:
        now = host.show(AGENT_UNIT, "ActiveState", "MainPID", "NRestarts")
        moved = now["MainPID"] not in ("0", ready["MainPID"])
        later = int(now["NRestarts"]) > int(ready["NRestarts"])
        return now if moved and later and now["ActiveState"] == "active" else None

    after = wait_for("systemd to restart the frozen agent", restarted, 30)
    # PID 1's messages about a unit carry UNIT=, the unit's own _SYSTEMD_UNIT=.
    messages = [e["MESSAGE"] for e in host.journal_since(cursor, UNIT=AGENT_UNIT)]
    assert any("Watchdog timeout" in m for m in messages), messages
    assert any("Failed with result 'watchdog'" in m for m in messages), messages
    assert int(after["NRestarts"]) == int(ready["NRestarts"]) + 1
    host.systemctl("stop", AGENT_UNIT)


def test_agent_and_gateway_log_to_the_journal_with_fields(systemd_host: SystemdHost) -> None:
    host = systemd_host
    install_agent(host, {})
    host.systemctl("restart", AGENT_UNIT)  # Type=notify: returns once READY=1 arrived
    invocation = host.show(AGENT_UNIT, "InvocationID")["InvocationID"]

    def ready_entries() -> list[dict[str, Any]]:
        entries = host.journal("-u", AGENT_UNIT)
        return [
            e
            for e in entries
            if e.get("_SYSTEMD_INVOCATION_ID") == invocation
            # The bare message: time, identifier and PID are journal fields.
            and str(e.get("MESSAGE", "")).startswith("ready: ")
        ]

    entry = wait_for("the agent's 'ready' line in the journal", ready_entries, 10)[0]
    assert entry["PRIORITY"] == "6"  # logging.INFO
    assert entry["SYSLOG_IDENTIFIER"] == "nixfarm-agent"
    assert entry["LOGGER"] == "nixfarm.agent"  # systemd-python's JournalHandler, not stderr
    assert entry["_SYSTEMD_UNIT"] == AGENT_UNIT
    host.systemctl("stop", AGENT_UNIT)

    cursor = host.journal_cursor()
    r = host.run(
        ["nixfarm", "gateway", "--client", "alice", "--role", "metrics"],
        check=False,
        env={"SSH_ORIGINAL_COMMAND": "sh -c id"},
    )
    assert r.returncode == 1, r
    assert "refused" in r.stderr and "uid=" not in r.stdout

    def refusals() -> list[dict[str, Any]]:
        return host.journal_since(cursor, SYSLOG_IDENTIFIER="nixfarm-gateway", NIXFARM_DECISION="refused")

    entry = wait_for("the gateway's refusal in the journal", refusals, 10)[0]
    assert entry["NIXFARM_CLIENT"] == "alice"
    assert entry["NIXFARM_ROLE"] == "metrics"
    assert entry["PRIORITY"] == "4"  # warning
    assert "sh -c id" in entry["MESSAGE"]


def test_the_agent_s_unit_lets_it_make_the_clients_demand_directory(systemd_host: SystemdHost) -> None:
    """Under the module's sandbox (CapabilityBoundingSet, RestrictSUIDSGID, ProtectSystem)
    the agent makes state_dir/demand, root:control_group 0770, where streams keep counts."""
    host = systemd_host
    install_agent(host, {"control_group": "nogroup"})
    host.systemctl("restart", AGENT_UNIT)
    try:
        st = host.path("/var/lib/nixfarm/demand").stat()
        assert (st.st_mode & 0o7777, st.st_uid) == (0o770, 0)
        r = host.run(["stat", "-c", "%G", "/var/lib/nixfarm/demand"])
        assert r.stdout.strip() == "nogroup"
    finally:
        host.systemctl("stop", AGENT_UNIT)


def test_metrics_read_nix_daemon_memory_from_systemd(systemd_host: SystemdHost) -> None:
    host = systemd_host
    set_daemon_limits(host, memory_max="512M", memory_high="448M", tasks=4096)
    props = ("MemoryCurrent", "MemoryMax", "ControlGroup", "TasksMax", "MainPID")
    before = host.show("nix-daemon.service", *props)
    memory = metrics(host)["nix_daemon_memory"]
    after = host.show("nix-daemon.service", *props)

    assert memory["source"] == "systemd", memory  # over D-Bus (pydbus), not cgroup files
    assert memory["error"] is None
    assert memory["cgroup"] == before["ControlGroup"]
    assert memory["max_bytes"] == int(before["MemoryMax"]) == 512 << 20
    currents = (int(before["MemoryCurrent"]), int(after["MemoryCurrent"]))
    low, high = min(currents) - MEMORY_TOLERANCE, max(currents) + MEMORY_TOLERANCE
    assert low <= memory["current_bytes"] <= high, (memory, currents)
    assert memory["oom_kills"] == daemon_oom_kills_from_kernel(before["ControlGroup"])
    # The drop-in's other keys took effect. (On cgroup v1 systemd applies
    # MemoryMax as memory.limit_in_bytes and ignores MemoryHigh: v1 has no
    # such knob.)
    assert before["TasksMax"] == "4096"
    oom_score_adj = host.path(f"/proc/{before['MainPID']}/oom_score_adj").read_text()
    assert oom_score_adj.strip() == "500"


def test_memory_cap_kills_the_build_and_not_nix_daemon(systemd_host: SystemdHost) -> None:
    host = systemd_host
    set_daemon_limits(host, memory_max="64M", memory_high="56M", tasks=512)
    daemon = host.show("nix-daemon.service", "MainPID", "ControlGroup")
    kills_before = metrics(host)["nix_daemon_memory"]["oom_kills"]
    assert isinstance(kills_before, int)

    # dd with a 300 MiB block allocates and fills a 300 MiB buffer.
    nonce = secrets.token_hex(4)
    hog = nix_build(
        host,
        f"memory-hog-{nonce}",
        "/bin/dd if=/dev/zero of=/dev/null bs=300M count=1 && echo done > $out",
    )
    assert hog.returncode != 0, hog.stdout
    assert "exit code 137" in hog.stderr or "signal 9" in hog.stderr, hog.stderr  # SIGKILL

    now = host.show("nix-daemon.service", "ActiveState", "MainPID")
    assert now == {"ActiveState": "active", "MainPID": daemon["MainPID"]}
    memory = metrics(host)["nix_daemon_memory"]
    assert memory["max_bytes"] == 64 << 20
    assert memory["oom_kills"] >= kills_before + 1, memory
    assert memory["oom_kills"] == daemon_oom_kills_from_kernel(daemon["ControlGroup"])

    ok = nix_build(host, f"after-the-hog-{nonce}", "echo hi > $out")
    assert ok.returncode == 0, ok.stderr
    assert host.path(ok.stdout.strip()).read_text() == "hi\n"
