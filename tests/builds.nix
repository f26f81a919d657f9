# Test derivations: /bin/sh builders (PATH is unset in builds), no nixpkgs needed.
#   nonce    makes each run's derivations new, so they really build
#   count    how many independent derivations
#   seconds  how long each sleeps
#   kib      size of each output, in KiB (0: a small text file)
#   slots    if > 0, hold one of the builder's slot tokens while working (emulated cores)
#   spin     if > 0, first count to it in the shell: CPU time the build really uses
#   fail     if 1, exit 1 without an output
{ nonce, count ? 1, seconds ? 0, kib ? 0, slots ? 0, features ? [ ], spin ? 0, fail ? 0 }:
let
  work =
    if fail > 0 then
      "exit 1"
    else if kib > 0 then
      "/bin/dd if=/dev/zero of=$out bs=1024 count=${toString kib} status=none"
    else
      "echo built on $(/bin/cat /proc/sys/kernel/hostname) > $out";
  one = i: derivation {
    name = "nixfarm-test-${nonce}-${toString i}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    requiredSystemFeatures = features;
    args = [
      "-c"
      (if slots > 0 then ''
        while :; do
          for s in /nix/var/nixfarm-slots/*; do
            exec 9<"$s"
            if /usr/bin/flock -n 9; then /bin/sleep ${toString seconds}; ${work}; exit 0; fi
            exec 9<&-
          done
          /bin/sleep 0.05
        done
      '' else "i=0; while [ $i -lt ${toString spin} ]; do i=$((i + 1)); done; /bin/sleep ${toString seconds}; ${work}")
    ];
  };
in
builtins.genList one count
