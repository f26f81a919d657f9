# Derivations for the scheduling benchmark (bench/bench_dispatch.py).
#
# Like tests/builds.nix with `slots`: each build holds one of its builder's slot
# tokens (flock on /nix/var/nixfarm-slots/*, made by the harness) while it
# works, so a builder runs at most that many at once (emulated cores,
# DESIGN.md). Each output also records, with the builder's clock (the host's:
# the harness shares one kernel), when the build started there and when it got
# a slot, so the benchmark can tell how long every build queued on a full builder:
#
#   <builder hostname> <started> <got a slot> <finished> <slot>
#
#   nonce    makes each run's derivations new, so they really build
#   count    how many independent derivations
#   seconds  how long each holds its slot
{ nonce, count ? 1, seconds ? 2 }:
let
  one = i: derivation {
    name = "nixfarm-sched-${nonce}-${toString i}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [
      "-c"
      ''
        started=$(/bin/date +%s.%N)
        while :; do
          for s in /nix/var/nixfarm-slots/*; do
            exec 9<"$s"
            if /usr/bin/flock -n 9; then
              got=$(/bin/date +%s.%N)
              /bin/sleep ${toString seconds}
              echo "$(/bin/cat /proc/sys/kernel/hostname) $started $got $(/bin/date +%s.%N) ''${s##*/}" > $out
              exit 0
            fi
            exec 9<&-
          done
          /bin/sleep 0.05
        done
      ''
    ];
  };
in
builtins.genList one count
