# memory-cap: a builder with a low nix-daemon MemoryMax. A build that
# allocates more is OOM-killed and fails with a clear log; nix-daemon and the
# agent stay up, the next build succeeds, and the agent's metrics count the
# OOM kill.
{ self }:
let
  node = import ./nodes.nix { inherit self; };
in
{
  nodes = {
    client = node.client {
      builders = [ "builder1" ];
      # Only the builder's memory cap is under test: Nix's static machines file.
      dispatcher.enable = false;
    };
    builder1 = node.builder {
      # Far below the VM's memory: the kernel kills the build at the cap,
      # in nix-daemon's cgroup, long before the machine runs short.
      builder.memoryMax = "256M";
      machine.virtualisation.memorySize = 1536;
    };
  };
}
