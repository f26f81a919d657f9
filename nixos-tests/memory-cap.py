# memory-cap: see memory-cap.nix. Runs after helpers.py (nixos-tests/default.nix).

CAP = 256 * MiB  # memory-cap.nix: services.nixfarm.builder.memoryMax
HOG_MIB = 1024  # what the killed build tries to hold

start_all()
wait_for_builder(builder1)
client.wait_for_unit("multi-user.target")


def oom_kills() -> int:
    """OOM kills in nix-daemon's cgroup, as the agent's metrics report them."""
    daemon = metrics(client, "builder1")["nix_daemon_memory"]
    kills = daemon["oom_kills"]
    check(isinstance(kills, int), f"the metrics have no OOM-kill count: {daemon}")
    return int(kills)


with subtest("nix-daemon runs under the configured cap"):
    # Socket-activated: a first remote build starts the daemon.
    out, build_log = build(client, derivation(client, "cap-warmup", hello_script("warm")))
    check(built_on(build_log) == "builder1", f"built on {built_on(build_log)}")
    daemon = metrics(client, "builder1")["nix_daemon_memory"]
    check(daemon["max_bytes"] == CAP, f"nix-daemon's MemoryMax is not {CAP}: {daemon}")
    kills_before = oom_kills()
    daemon_pid = main_pid(builder1, "nix-daemon.service")
    agent_pid = main_pid(builder1, "nixfarm-agent.service")
    check(daemon_pid > 0 and agent_pid > 0, "nix-daemon or the agent is not running")

with subtest("a build over the cap is killed, with a clear log"):
    out = build_fails(client, derivation(client, "memory-hog", hog_script(HOG_MIB)))
    check("signal 9" in out, f"the build was not killed by SIGKILL:\n{out}")
    check("holding" in out, f"the build's own log is not shown:\n{out}")
    check("the memory cap did not apply" not in out, f"the build was not capped:\n{out}")
    # The kernel and systemd say what happened, and where.
    builder1.succeed("journalctl -k --no-pager | grep -i 'memory cgroup out of memory'")
    builder1.succeed("journalctl -u nix-daemon.service --no-pager | grep -i 'killed by the OOM killer'")

with subtest("nix-daemon and the agent stay up"):
    builder1.require_unit_state("nix-daemon.service", "active")
    builder1.require_unit_state("nixfarm-agent.service", "active")
    check(main_pid(builder1, "nix-daemon.service") == daemon_pid, "nix-daemon was restarted")
    check(main_pid(builder1, "nixfarm-agent.service") == agent_pid, "the agent was restarted")

with subtest("the next build succeeds"):
    out, build_log = build(client, derivation(client, "cap-after", hello_script("after the OOM kill")))
    check(built_on(build_log) == "builder1", f"built on {built_on(build_log)}")
    check(client.succeed(f"cat {out}").strip() == "after the OOM kill", "wrong output")

with subtest("the agent's metrics count the OOM kill"):
    eventually("nix_daemon_memory.oom_kills to grow", lambda: oom_kills() > kills_before, 30)
