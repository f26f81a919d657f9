# gateway: see gateway.nix. Runs after helpers.py (nixos-tests/default.nix).

start_all()
wait_for_builder(builder1)
client.wait_for_unit("multi-user.target")


def gateway_journal() -> str:
    """What the gateway logged on builder1 (every decision, allowed or refused)."""
    return builder1.succeed("journalctl -t nixfarm-gateway --no-pager -o cat")


with subtest("a login shell is refused"):
    # No command: sshd runs the forced gateway with no SSH_ORIGINAL_COMMAND.
    out = client.fail("ssh -T -o BatchMode=yes builder1 < /dev/null 2>&1")
    check("interactive login is not allowed" in out, f"no refusal:\n{out}")

with subtest("sh -c id is refused and never runs"):
    out = ssh_refused(client, "builder1", "sh -c id")
    check("refused: command 'sh' is not allowed" in out, f"no refusal:\n{out}")
    check("uid=" not in out, f"id ran:\n{out}")
    out = ssh_refused(client, "builder1", "nixfarm metrics; id")
    check("is not allowed: commands are argv words, not shell" in out, f"no refusal:\n{out}")
    check("uid=" not in out, f"id ran:\n{out}")

with subtest("port forwarding is refused"):
    # Local forwarding: the builder refuses the direct-tcpip channel.
    out = client.fail("ssh -o BatchMode=yes -W localhost:22 builder1 < /dev/null 2>&1")
    check("administratively prohibited" in out, f"stdio forwarding was not refused:\n{out}")
    # Remote forwarding: the builder refuses the tcpip-forward request.
    forward = "-o ExitOnForwardFailure=yes -R 127.0.0.1:2222:127.0.0.1:22"
    out = client.fail(ssh_command("builder1", "nixfarm metrics --json", options=forward) + " 2>&1")
    check("remote port forwarding failed" in out, f"remote forwarding was not refused:\n{out}")

with subtest("a pty is refused"):
    # sshd refuses the pty request (restrict, PermitTTY no); the command then
    # runs without a terminal, which the gateway also checks.
    out = client.succeed(ssh_command("builder1", "nixfarm metrics --json", options="-tt") + " 2>&1")
    check("PTY allocation request failed" in out, f"a pty was allocated:\n{out}")

with subtest("nix-daemon --stdio works, as an untrusted user (services.nixfarm.farm.trust)"):
    out = client.succeed(f"{NIX} store info --store ssh-ng://builder1 2>&1")
    check("Trusted: 0" in out, f"the builder user is a trusted Nix user:\n{out}")
    # What the client's Nix builds itself it signs (secret-key-files), and the builder takes
    # it; a path built without that signature it refuses. (Built on the client: max-jobs 1.)
    local = "nix-build --no-out-link --max-jobs 1 --builders ''"
    signed = client.succeed(f"{local} {derivation(client, 'gateway-signed', hello_script('signed'))}").strip()
    unsigned_drv = derivation(client, "gateway-unsigned", hello_script("unsigned"))
    unsigned = client.succeed(f"{local} --option secret-key-files '' {unsigned_drv}").strip()
    sigs = client.succeed(f"{NIX} path-info --sigs {signed}")
    check("nixfarm-vm-test-only-client:" in sigs, f"the client did not sign {signed}: {sigs}")
    client.succeed(f"{NIX} copy --to ssh-ng://builder1 {signed}")
    out = client.fail(f"{NIX} copy --to ssh-ng://builder1 {unsigned} 2>&1")
    check("lacks a signature by a trusted key" in out, f"an unsigned path was accepted:\n{out}")
    # The legacy protocol (ssh://, nix-store --serve --write) goes through too.
    client.succeed(f"{NIX} store info --store ssh://builder1")

with subtest("a metrics-role key reads metrics but cannot build"):
    snap = metrics(client, "builder1", key=MONITOR_KEY)
    check(snap["hostname"] == "builder1", f"metrics from {snap['hostname']}")
    out = ssh_refused(client, "builder1", "nix-daemon --stdio", key=MONITOR_KEY)
    check("needs the build role; this key has the metrics role" in out, f"no refusal:\n{out}")
    store = f"ssh-ng://builder1?ssh-key={MONITOR_KEY}"
    client.fail(f"{NIX} store info --store '{store}'")
    # And a build key cannot run the builder's GC (admin role only).
    out = ssh_refused(client, "builder1", "nixfarm gc --now")
    check("needs the admin role; this key has the build role" in out, f"no refusal:\n{out}")

with subtest("the gateway logs each decision"):
    journal = gateway_journal()
    check("refused client=monitor role=metrics" in journal, f"no refusal logged:\n{journal}")
    check("allowed client=client role=build" in journal, f"no allowed session logged:\n{journal}")
