# gc: see gc.nix. Runs after helpers.py (nixos-tests/default.nix).

# gc.nix: the agent collects below 160 MiB free and stops at 256 MiB.
MIN_FREE = 160 * MiB
MAX_FREE = 256 * MiB
FILL_MIB = 16
# 384 MiB of store: about 14 fills cross min-free; stop well after that.
MAX_FILLS = 40

start_all()
wait_for_builder(builder1)
client.wait_for_unit("multi-user.target")


def agent_passes() -> list[dict[str, Any]]:
    """The agent's own GC passes on builder1 (not those an admin asked for)."""
    history = gc_status(client, "builder1")["history"]
    return [run for run in history if run.get("reason") == "below min-free"]


def fill(n: int) -> str:
    """One remote build of FILL_MIB MiB on builder1; returns its output path.

    The client deletes its own copy at once: only the builder's store fills.
    """
    out, build_log = build(client, derivation(client, f"fill-{n}", fill_script(FILL_MIB, f"fill {n}")))
    check(built_on(build_log) == "builder1", f"fill {n} went to {built_on(build_log)}")
    client.succeed(f"nix-store --delete {out}")
    return out


with subtest("a rooted path is built first, so it is the oldest"):
    keep = build(client, derivation(client, "keep", fill_script(FILL_MIB, "keep")))[0]
    builder1.succeed(f"ln -s {keep} /nix/var/nix/gcroots/nixfarm-test-keep")
    check(store_free(builder1) > MIN_FREE, "the store starts below min-free: make it bigger")

with subtest("remote builds fill the store until the agent collects"):
    fills: list[str] = []
    while not agent_passes():
        check(len(fills) < MAX_FILLS, f"{len(fills)} fills and no GC pass by the agent")
        fills.append(fill(len(fills)))
    client.log(f"the agent collected after {len(fills)} fills")

with subtest("the agent brought free space back above max-free"):
    run = agent_passes()[-1]
    check(run["error"] is None, f"the pass failed: {run}")
    check(run["deleted"] > 0 and run["bytes_freed"] > 0, f"the pass deleted nothing: {run}")
    check(run["free_after"] >= MAX_FREE, f"the pass stopped below max-free: {run}")
    # A build may have written up to one more fill since the pass ended.
    free = store_free(builder1)
    check(free >= MAX_FREE - (FILL_MIB + 1) * MiB, f"only {free >> 20} MiB free after the pass")

with subtest("the rooted path survived; fills were deleted"):
    check(valid_in_store(builder1, keep), "the rooted path was deleted")
    gone = [path for path in fills if not valid_in_store(builder1, path)]
    check(bool(gone), "no fill was deleted from the store")
    client.log(f"{len(gone)} of {len(fills)} fills deleted")

with subtest("builds keep succeeding"):
    for _ in range(3):
        fills.append(fill(len(fills)))

with subtest("an admin key runs a pass through the gateway and the agent's control socket"):
    target = store_free(builder1) + 32 * MiB
    dry_run = ssh(client, "builder1", f"nixfarm gc --dry-run --json --target-free {target}", key=OPS_KEY)
    plan = json_of(dry_run, "gc --dry-run")
    check(plan.get("event") == "done", f"gc --dry-run: {plan}")
    entries = plan["result"]["plan"]
    check(bool(entries), f"nothing planned for a target above the free space: {plan}")
    check(keep not in [entry["path"] for entry in entries], "the rooted path is in the plan")
    # Least recently used first: paths never seen in use (last_used null),
    # then by last use. The fills refer to nothing, so each stands alone.
    used = [entry["last_used"] or 0.0 for entry in entries]
    check(used == sorted(used), f"the plan is not least recently used first: {used}")
    now = ssh(client, "builder1", f"nixfarm gc --now --json --target-free {target}", key=OPS_KEY)
    answer = json_of(now, "gc --now")
    check(answer.get("event") == "done", f"gc --now: {answer}")
    result = answer["result"]
    check(result["error"] is None and result["deleted"] > 0, f"gc --now did nothing: {result}")
    check(result["free_after"] >= target, f"gc --now stopped below its target: {result}")
    check(valid_in_store(builder1, keep), "the rooted path was deleted")
    history = gc_status(client, "builder1")["history"]
    check(history[-1]["reason"] == "requested", f"the requested pass is not in the history: {history[-1]}")
