# memory-cap: a builder with a low nix-daemon MemoryMax. A build that
# allocates more is OOM-killed and fails with a clear log; nix-daemon and the
# agent stay up, the next build succeeds, and the agent's metrics count the
# OOM kill.
{ self }:
{
  nodes = {
    client = {
      imports = [
        self.nixosModules.client
        ./node.nix
      ];
      services.nixfarm.client = {
        enable = true;
        sshKey = "/etc/nix/nixfarm_ed25519";
        builders = [ "builder1" ];
        # Only the builder's memory cap is under test: Nix's static machines file.
        dispatcher.enable = false;
      };
    };
    builder1 = {
      imports = [
        self.nixosModules.builder
        ./node.nix
      ];
      services.nixfarm.builder = {
        enable = true;
        # Far below the VM's memory: the kernel kills the build at the cap,
        # in nix-daemon's cgroup, long before the machine runs short.
        memoryMax = "256M";
      };
      virtualisation.memorySize = 1536;
    };
  };
}
