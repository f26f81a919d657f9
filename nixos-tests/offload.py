# offload: see offload.nix. Runs after helpers.py (nixos-tests/default.nix).

start_all()

with subtest("the builders and the client come up"):
    for machine in (builder1, builder2):
        wait_for_builder(machine)
    client.wait_for_unit("multi-user.target")
    client.wait_for_unit("nixfarm-dispatch.service")


def check_snapshot(host: str, snap: dict[str, Any]) -> None:
    """A builder's metrics snapshot, with the numbers a real NixOS builder has."""
    check(snap["hostname"] == host, f"{host}: the snapshot is from {snap['hostname']}")
    check(snap["cpus"] >= 1, f"{host}: no CPUs in {snap}")
    store = snap["store"]
    check(0 < store["free_bytes"] <= store["total_bytes"], f"{host}: store sizes {store}")
    check(snap["memory"]["total_bytes"] > 0, f"{host}: memory {snap['memory']}")
    check(snap["nix_config"]["max_jobs"] == 2, f"{host}: farm.nix gives maxJobs 2: {snap['nix_config']}")
    daemon = snap["nix_daemon_memory"]
    # Read from systemd over D-Bus; MemoryMax defaults to 90% of the RAM.
    check(daemon["source"] == "systemd", f"{host}: nix-daemon memory not from systemd: {daemon}")
    max_bytes = daemon["max_bytes"]
    check(isinstance(max_bytes, int) and max_bytes > 0, f"{host}: nix-daemon has no MemoryMax: {daemon}")


with subtest("the client reads each builder's metrics over SSH with its key"):
    for host in ("builder1", "builder2"):
        check_snapshot(host, metrics(client, host))

# `nixfarm dispatch` and `nixfarm status` came with issue 4.
with subtest("nixfarm status shows both builders healthy, with their real numbers"):
    for host in ("builder1", "builder2"):
        wait_healthy(client, host)
        wait_listed(client, host, listed=True, timeout=60)
    status = dispatcher_status(client)
    for host in ("builder1", "builder2"):
        check_snapshot(host, status[host]["snapshot"])
        line = status[host]["line"] or ""
        check(line.startswith(f"ssh-ng://nixfarm@{host} "), f"{host}: Nix sees {line!r}")

with subtest("a build from the client runs on a builder"):
    out, build_log = build(client, derivation(client, "offload-hello", hello_script("hello from the farm")))
    host = built_on(build_log)
    check(host in ("builder1", "builder2"), f"built on {host}, not on a farm builder")
    builder, other = (builder1, builder2) if host == "builder1" else (builder2, builder1)
    # The output was built there, copied back, and is in both stores.
    check(valid_in_store(builder, out), f"{out} is not in {host}'s store")
    check(not valid_in_store(other, out), f"{out} was built on both builders")
    check(client.succeed(f"cat {out}").strip() == "hello from the farm", "wrong output")
    check(builder.succeed(f"cat {out}") == client.succeed(f"cat {out}"), "outputs differ")
    # The gateway let the client's key in for the Nix daemon protocol, and said so.
    builder.succeed(
        "journalctl -t nixfarm-gateway --no-pager"
        " | grep \"allowed client=client role=build .*command='nix-daemon --stdio'\""
    )


def logins(machine: Machine) -> int:
    """SSH logins of the builder user so far (sshd or, from OpenSSH 9.8, sshd-session, logs them)."""
    return int(machine.succeed("journalctl --no-pager | grep -c 'Accepted publickey for nixfarm' || true"))


with subtest("nix-daemon's ssh kept the build's connection open, and the next build there shares it"):
    # services.nixfarm.client.connectionSharing (on by default; ControlPersist 60 s).
    check(client.succeed("stat -c '%a %U' /run/nixfarm-ssh").strip() == "700 root", "socket directory")
    client.succeed(f"ssh -O check {host}")  # as root, by the name Nix uses: "Master running"
    by_name = {"builder1": builder1, "builder2": builder2}
    seen = {host: logins(by_name[host])}
    # Three builds on two builders: one of them gets a second build, over the open connection.
    for n in range(3):
        out, build_log = build(client, derivation(client, f"offload-shared-{n}", hello_script(f"shared {n}")))
        on = built_on(build_log)
        if on in seen:
            check(logins(by_name[on]) == seen[on], f"a build on {on} logged in anew: nothing was shared")
            break
        client.succeed(f"ssh -O check {on}")
        seen[on] = logins(by_name[on])
    else:
        raise AssertionError(f"three builds and no builder got two: {sorted(seen)}")


with subtest("the builders account the builds to the client; usage adds them up; Prometheus sees them"):
    # Under the hardened agent unit: build logs, temp roots, sockets of workers and sshd.
    def finished_on(host: str) -> float:
        return float(accounts(client, host).get("client", {}).get("builds_finished", 0))

    eventually("the builds are accounted", lambda: finished_on("builder1") + finished_on("builder2") >= 3)
    for host in ("builder1", "builder2"):
        # The monitor key (role metrics) sees the numbers, not whose they are.
        check(set(accounts(client, host, MONITOR_KEY)) <= {"(others)", "monitor"}, f"{host}: names shown")
    usage = json_of(client.succeed("nixfarm usage --json"), "nixfarm usage")
    check(usage["unavailable"] == {}, f"builders did not answer: {usage['unavailable']}")
    (row,) = [r for r in usage["rows"] if r["client"] == "client"]
    check(row["builds_finished"] >= 3 and row["sent_bytes"] > 0, f"usage of the client: {row}")
    scrape = client.succeed("curl --fail --silent --max-time 10 http://builder1:9716/metrics")
    check('nixfarm_client_builds_started_total{client="client"}' in scrape, "no per-client counter")
