# failover: see failover.nix. Runs after helpers.py (nixos-tests/default.nix).
# Needs the dispatcher of issue 4 (`nixfarm dispatch`, `nixfarm status`).

# From failover.nix's dispatcher flags: a dead link is seen after 2 intervals
# (stalled stream) and 3 missed keepalives, about 5 s; a restored one at the
# next retry, at most 10 s (+20% jitter) later plus a connect. The bounds
# leave room for slow CI machines without hiding a dispatcher that waits for
# minutes.
LEAVE_WITHIN = 30.0
RETURN_WITHIN = 60.0

start_all()

with subtest("the builders and the client come up"):
    for machine in (builder1, builder2):
        wait_for_builder(machine)
    client.wait_for_unit("nixfarm-dispatch.service")
    for host in ("builder1", "builder2"):
        wait_healthy(client, host)
        wait_listed(client, host, listed=True, timeout=60)

with subtest("builder1 leaves the machines file when its link goes down"):
    builder1.block()
    took = wait_listed(client, "builder1", listed=False, timeout=LEAVE_WITHIN)
    client.log(f"builder1 left the machines file {took:.1f} s after its link went down")
    check("builder2" in listed_builders(client), "builder2 left too")
    reason = dispatcher_status(client)["builder1"]["reason"]
    check(bool(reason), "the dispatcher gives no reason for leaving builder1 out")


def slot_held(host: str, slot: int) -> bool:
    """Does something (the dispatcher) hold this slot in Nix's load accounting?"""
    lock = f"/nix/var/nix/current-load/ssh-ng:__nixfarm@{host}-{slot}"
    return client.execute(f"flock --nonblock {lock} true")[0] != 0


with subtest("the dispatcher holds builder1's slots, so hooks that still list it pass it by"):
    # Nix's hook keeps the machines file it read at its start; the held locks are
    # what it checks for every build (agent/nixfarm/client/slots.py).
    for slot in (0, 1):  # farm.nix: maxJobs 2
        check(slot_held("builder1", slot), f"builder1's slot {slot} is not held")
    check(not slot_held("builder2", 0), "builder2's first slot is held on an idle farm")

with subtest("builds still succeed, on builder2"):
    for n in range(3):
        out, build_log = build(client, derivation(client, f"failover-{n}", hello_script(f"build {n}")))
        check(built_on(build_log) == "builder2", f"build {n} went to {built_on(build_log)}")
        check(valid_in_store(builder2, out), f"{out} is not in builder2's store")

with subtest("builder1 comes back when its link is restored"):
    builder1.unblock()
    took = wait_listed(client, "builder1", listed=True, timeout=RETURN_WITHIN)
    client.log(f"builder1 was back in the machines file {took:.1f} s after its link came back")
    wait_healthy(client, "builder1", timeout=RETURN_WITHIN)
    eventually("builder1's slots are let go", lambda: not slot_held("builder1", 0), timeout=30)
    out, build_log = build(client, derivation(client, "failover-after", hello_script("after")))
    check(built_on(build_log) in ("builder1", "builder2"), "the build after the return missed the farm")
