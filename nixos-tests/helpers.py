# Typed helpers for nixfarm's VM tests.
#
# nixos-tests/default.nix puts this file before each test's own script and
# the NixOS test driver runs the two as one script, so `Machine`, `start_all`,
# `subtest` and the machines (client, builder1, ...) are the driver's globals
# here (ruff.toml: F821 is off for these files). tests/test_vm_tests.py
# compiles, lints and type-checks each helpers.py + <test>.py pair the way the
# driver does (pyflakes, mypy) before any VM runs.
import base64
import json
import os
import re
import shlex
import time
from collections.abc import Callable
from typing import Any

# The client's own key (services.nixfarm.client.sshKey in every test), and the
# keys of the other roles in farm.nix, which node.nix puts on the client.
CLIENT_KEY = "/etc/nix/nixfarm_ed25519"
MONITOR_KEY = "/etc/nixfarm-test/monitor_ed25519"  # role "metrics"
OPS_KEY = "/etc/nixfarm-test/ops_ed25519"  # role "admin"
# services.nixfarm.client.dispatcher.machinesFile (its default).
MACHINES_FILE = "/var/lib/nixfarm-client/machines"
MiB = 1 << 20
# The `nix` command of the NixOS release under test, without touching nix.conf.
NIX = "nix --extra-experimental-features nix-command"

# A derivation without nixpkgs or any store input: the sandbox's /bin/sh
# (busybox ash, builtins only; PATH is unset in builds) runs builder.sh.
# Nothing to copy to the builder or substitute, so a build shows only what
# the farm does. builder.sh must create $out.
DERIVATION = """derivation {
  name = "@name@";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" (builtins.readFile ./builder.sh) ];
}
"""


class FarmTestError(Exception):
    """A check of a nixfarm VM test failed; the message says what was expected."""


def check(condition: bool, message: str) -> None:
    """Fail the test with `message` unless `condition` holds (also under python -O)."""
    if not condition:
        raise FarmTestError(message)


def eventually(what: str, probe: Callable[[], bool], timeout: float = 120.0) -> float:
    """Poll `probe` every second until it is true; returns the seconds it took.

    The one retry helper of these tests: fails with `what` after `timeout`.
    """
    start = time.monotonic()
    while not probe():
        if time.monotonic() - start > timeout:
            raise FarmTestError(f"not within {timeout:.0f} s: {what}")
        time.sleep(1)
    return time.monotonic() - start


def write_file(machine: Machine, path: str, text: str) -> None:
    """Write `text` to `path` on `machine`, byte for byte (no shell quoting involved)."""
    data = base64.b64encode(text.encode()).decode()
    directory = shlex.quote(os.path.dirname(path))
    machine.succeed(f"mkdir -p {directory} && echo {data} | base64 -d > {shlex.quote(path)}")


def derivation(client: Machine, name: str, script: str) -> str:
    """A Nix file on `client` whose derivation `name` runs `script`; returns its path."""
    directory = f"/root/drv/{name}"
    write_file(client, f"{directory}/builder.sh", script)
    write_file(client, f"{directory}/default.nix", DERIVATION.replace("@name@", name))
    return f"{directory}/default.nix"


def hello_script(text: str) -> str:
    """A build that writes `text` to $out."""
    return f"echo {shlex.quote(text)} > $out\n"


def fill_script(mib: int, tag: str) -> str:
    """A build whose output is `mib` MiB (1 MiB of text doubled up from 16 bytes)."""
    return f"""s=0123456789abcdef
i=0
while [ $i -lt 16 ]; do s="$s$s"; i=$((i + 1)); done
n=0
while [ $n -lt {mib} ]; do printf '%s' "$s" >> $out; n=$((n + 1)); done
echo {shlex.quote(tag)} >> $out
"""


def hog_script(mib: int) -> str:
    """A build that holds ever more memory in one shell variable, up to `mib` MiB.

    Killed by the OOM killer (signal 9) under a lower memory cap; if it ever
    finishes, it fails with a message saying the cap did not apply.
    """
    bits = (mib * MiB).bit_length() - 1
    return f"""echo "nixfarm memory-cap test: allocating up to {mib} MiB"
s=0123456789abcdef
i=4
while [ $i -lt {bits} ]; do
  s="$s$s"
  i=$((i + 1))
  if [ $i -ge 20 ]; then echo "holding $((1 << (i - 20))) MiB"; fi
done
echo "allocated {mib} MiB and was not killed: the memory cap did not apply"
exit 1
"""


def build(client: Machine, nix_file: str) -> tuple[str, str]:
    """Build `nix_file` from `client` (which only builds remotely); returns (output, build log)."""
    build_log = client.succeed(f"nix-build --no-out-link {shlex.quote(nix_file)} 2>&1")
    outputs = [line for line in build_log.splitlines() if line.startswith("/nix/store/")]
    check(bool(outputs), f"nix-build printed no output path:\n{build_log}")
    return outputs[-1], build_log


def build_fails(client: Machine, nix_file: str) -> str:
    """Build `nix_file` from `client`, which must fail; returns Nix's output."""
    return client.fail(f"nix-build --no-out-link {shlex.quote(nix_file)} 2>&1")


def built_on(build_log: str) -> str:
    """The builder a build went to, from Nix's "building '<drv>' on '<uri>'" line."""
    match = re.search(r"building '[^']+' on 'ssh(?:-ng)?://[^@']+@([^'/:]+)'", build_log)
    if match is None:
        raise FarmTestError(f"the build did not go to a remote builder:\n{build_log}")
    return match.group(1)


def valid_in_store(machine: Machine, path: str) -> bool:
    """Whether `path` is a valid path in `machine`'s Nix store."""
    status, _ = machine.execute(f"nix-store --check-validity {shlex.quote(path)}")
    return status == 0


def ssh_command(host: str, command: str, key: str = CLIENT_KEY, options: str = "") -> str:
    """The ssh command line a client runs to reach `host`'s gateway with `key`.

    The rest (user, host key, timeouts) comes from the client module's
    ssh_config and known hosts, as for nix-daemon. BatchMode: never a prompt.
    """
    return (
        f"ssh -o BatchMode=yes -o IdentitiesOnly=yes -i {key} {options} "
        f"{host} {shlex.quote(command)} < /dev/null"
    )


def ssh(client: Machine, host: str, command: str, key: str = CLIENT_KEY) -> str:
    """Run `command` through `host`'s gateway; its stdout (stderr goes to the test's log)."""
    return client.succeed(ssh_command(host, command, key))


def ssh_refused(client: Machine, host: str, command: str, key: str = CLIENT_KEY) -> str:
    """Run `command` through `host`'s gateway, which must refuse it; stdout and stderr."""
    return client.fail(ssh_command(host, command, key) + " 2>&1")


def json_of(text: str, what: str) -> Any:
    """`text` decoded as JSON, or a failure that shows it."""
    try:
        return json.loads(text)
    except ValueError as e:
        raise FarmTestError(f"{what} is not JSON ({e}):\n{text}") from None


def metrics(client: Machine, host: str, key: str = CLIENT_KEY) -> dict[str, Any]:
    """One metrics snapshot of `host`, read over SSH through its gateway."""
    snap = json_of(ssh(client, host, "nixfarm metrics --json", key), f"{host}'s metrics")
    check(isinstance(snap, dict) and snap.get("schema") == 1, f"{host}: not a schema-1 snapshot")
    return dict(snap)


def accounts(client: Machine, host: str, key: str = CLIENT_KEY) -> dict[str, Any]:
    """`host`'s per-client accounts (nixfarm accounts), read through its gateway with `key`."""
    report = json_of(ssh(client, host, "nixfarm accounts --json", key), f"{host}'s accounts")
    check(isinstance(report, dict) and isinstance(report.get("clients"), dict), f"{host}: {report}")
    return dict(report["clients"])


def gc_status(client: Machine, host: str) -> dict[str, Any]:
    """`nixfarm gc --status --json` of `host` (any role may read it): state and history."""
    status = json_of(ssh(client, host, "nixfarm gc --status --json"), f"{host}'s GC status")
    return dict(status)


def store_free(machine: Machine) -> int:
    """Free bytes of the filesystem of `machine`'s /nix/store, as the agent sees them."""
    blocks, size = machine.succeed("stat -f -c '%a %S' /nix/store").split()
    return int(blocks) * int(size)


def main_pid(machine: Machine, unit: str) -> int:
    """The main PID of `unit` (0 when it is not running)."""
    return int(machine.succeed(f"systemctl show -P MainPID {unit}").strip())


def wait_for_builder(builder: Machine) -> None:
    """Wait until `builder` serves SSH and its agent is ready (Type=notify: READY=1 sent)."""
    builder.wait_for_unit("sshd.service")
    builder.wait_for_unit("nixfarm-agent.service")
    builder.wait_for_open_port(22)


def listed_builders(client: Machine) -> set[str]:
    """The builders Nix sees in the dispatcher's machines file."""
    hosts = set()
    for line in client.succeed(f"cat {MACHINES_FILE}").splitlines():
        match = re.match(r"ssh(?:-ng)?://[^@\s]+@([^\s/:]+)\s", line)
        if match:
            hosts.add(match.group(1))
    return hosts


def wait_listed(client: Machine, builder: str, listed: bool, timeout: float) -> float:
    """Wait until `builder` is (or is no longer) in the machines file; returns the seconds."""
    state = "listed" if listed else "left out"
    return eventually(
        f"{builder} {state} in {MACHINES_FILE}",
        lambda: (builder in listed_builders(client)) == listed,
        timeout,
    )


def dispatcher_status(client: Machine) -> dict[str, dict[str, Any]]:
    """`nixfarm status --json` on `client`: the dispatcher's view, by builder name."""
    status = json_of(client.succeed("nixfarm status --json"), "nixfarm status --json")
    return {entry["name"]: entry for entry in status["builders"]}


def healthy(client: Machine, builder: str) -> bool:
    """Whether the dispatcher reports `builder` healthy with a fresh snapshot."""
    entry = dispatcher_status(client).get(builder, {})
    return entry.get("state") == "healthy" and bool(entry.get("snapshot"))


def wait_healthy(client: Machine, builder: str, timeout: float = 120.0) -> float:
    """Wait until the dispatcher reports `builder` healthy; returns the seconds it took."""
    return eventually(f"the dispatcher reports {builder} healthy", lambda: healthy(client, builder), timeout)
